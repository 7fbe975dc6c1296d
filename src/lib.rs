//! # worker-events
//!
//! Publish/subscribe between the worker processes of one host — the prefork model of
//! nginx-style proxies — with the semantics of Kong's `lua-resty-events` and without its
//! weaknesses.
//!
//! ## Architecture
//!
//! ```text
//!  worker 0 --writes once--> broadcast ring of 0 --each reader's cursor--> workers 1, 2, ...
//!  worker 1 --writes once--> broadcast ring of 1 --> workers 0, 2, ...      one per slot
//!    |  \________ SPSC ring 0->1 ________/ |        one per ordered pair: readers that fell
//!    |<_________ ring 1->0 ____|                     behind (all, with broadcast_capacity(0))
//!    '-- control channel: unix socket at `listening`, served by the elected broker
//!  all rings in ONE sealed memfd region; one eventfd per slot, one fan-out eventfd
//! ```
//!
//! * **Fast path, broker-less.** `publish(Target::All)` serializes the event once and
//!   writes it once, into the publisher's **broadcast ring** (`ring/mcast.rs`), which every
//!   other slot reads through its own cursor (the per-publisher topology, the default: see
//!   [`Options::broadcast_capacity`]); a receiver is woken through its eventfd only if it
//!   is parked (a flag in shared memory), so a busy receiver costs the publisher no
//!   syscall; a commit that finds three or more receivers parked wakes them all with one
//!   write of the group's fan-out eventfd, which every worker's epoll set holds. A receiver
//!   that falls a whole broadcast ring behind is never lapped: the
//!   publisher first copies what it has not read into the **SPSC ring** of that pair and
//!   serves it there until it has caught up (`transport/shm/bcast.rs`). With
//!   `broadcast_capacity(0)` the event is copied into the pair ring of every other slot
//!   instead. The publisher's own copy goes to a private queue, in order with its
//!   `Current` events. The broker is not on this path. A burst published through one
//!   [`Batch`] ([`Worker::batch`]) is committed once, at its end, and wakes each parked
//!   receiver at most once.
//! * **Rings** (`ring.rs`): variable-length records, one Release store per
//!   commit, cached positions, producer and consumer words on separate 128-byte lines.
//!   Messages larger than a quarter of a ring are streamed in fragments. A ring that is
//!   full keeps the publisher's messages in a bounded private backlog, retried on every
//!   publish/dispatch; the consumer wakes the producer when it frees space.
//! * **Control channel.** The broker (preferred: `broker_id`) is elected with a kernel lock
//!   on `<listening>.lock`; every worker also locks its own slot byte there, so two live
//!   processes can never hold one id. Attaching workers receive the region memfd and all
//!   eventfds over `SCM_RIGHTS` after an `SO_PEERCRED` uid check. Frames are
//!   length-prefixed and survive partial reads.
//! * **Socket fallback.** With [`Transport::Socket`], or [`Transport::Auto`] when the broker
//!   cannot create the memfd region, every event rides the control connections through the
//!   broker: one bounded queue per destination slot (attached or not yet), coalesced writes,
//!   buffered reads, `lost` notices for what a full queue dropped. The broker decides the
//!   mode and workers learn it at attach ([`Worker::transport`]).
//! * **No hidden threads.** Everything happens inside [`Worker::dispatch`] /
//!   [`Worker::wait`]; [`Worker`] is `AsFd` for external event loops. [`Events::new`] opens
//!   nothing and is fork-safe.
//!
//! The byte layout of the region is documented in `shm-layout.md` at the repository root.
//!
//! ### Source layout
//!
//! One concern per file, dependencies pointing down (the rules are checked by
//! `scripts/check-layers.sh`; the design and guarantees are in `ARCHITECTURE.md`):
//! `worker/` (the facade: [`Events`], [`Worker`]) uses `transport/` (the data path as one
//! enum: in-process, not attached yet, shared-memory rings, socket) and `control/`
//! (connections, election, the attach protocol); those two never import each other and
//! meet in `wire/` (frame codec, connection queues). Below them: `region`, `ring`,
//! `notify`, `dedup`, `layout` (every shared `#[repr(C)]` type), `sync` (the atomics shim)
//! and `sys` (every system call).
//!
//! `crossbeam-utils` is a dependency but has no job yet: [`Worker::wait`] has no spin
//! phase for its `Backoff` to pace (it arms and sleeps in `epoll_wait` at once; spinning is
//! busy-poll mode, where the caller owns the loop), and a [`Worker`] is single-threaded, so
//! no process-private state is shared between cores for `CachePadded` to separate (the
//! shared words already sit on their own 128-byte lines, see `layout.rs`).
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
//! * Socket transport: events queued in a worker survive a broken broker connection and go
//!   to the next broker exactly once; events already handed to a broker that then dies, and
//!   the dead broker's own queues and dedup table, are lost with it (at most once), and
//!   receivers learn of those losses from the gap in the publisher's sequence numbers
//!   (a `lost` notice).
//!
//! ### Failover (shared-memory transport)
//!
//! * **Broker killed.** The broker is whoever holds byte 0 of `<listening>.lock`; the
//!   kernel releases it when the broker dies, however it dies. Its clients see their control
//!   connection close and run for election at once (a worker that holds the shared region
//!   skips the start-up grace); the winner keeps the region it already maps (rings, dedup
//!   table), bumps the broker epoch, and listens on the socket path, replacing the stale
//!   socket file (only ever a socket: any other file there is an error, never deleted). The
//!   others reconnect with exponential backoff, 1 ms doubling to 50 ms, each delay drawn from
//!   `[d/2, d]` (jitter), reset once attached. `All` events keep flowing through the rings the
//!   whole time; [`Worker::is_ready`] is false until re-attached. Each worker that was attached
//!   gets a `("worker-events", "broker")` notice carrying [`NewBroker`] once it is attached to
//!   the new broker (the new broker when it takes over). Measured with real SIGKILLs
//!   (`tests/failover.rs`, debug build, noisy 2-core VM): the new broker serves 1–5 ms after
//!   the kill, and every survivor is re-attached after 10 ms (p50), 25 ms (p99).
//! * **The live region is kept.** A worker holds lock byte `2^24 + slot` while it maps the
//!   region. A worker that has no region yet (just started) does not run for election while
//!   another live process holds one, for up to 1 s: a region holder is about to take over,
//!   and a fresh region would strand every event queued in the live one.
//! * **Fencing.** Every election adds one to `broker_epoch` in the region header. A broker
//!   that finds another value there (a second broker elected over the same region, for
//!   example after the lock file was deleted and recreated) stops serving, releases the
//!   broker lock, closes its connections and stays out of elections for 200 ms; its clients
//!   resend their unacknowledged unique events to the other broker (socket transport). It
//!   checks before handling control traffic and, on the socket transport, before routing
//!   unique events.
//! * **Broker stuck.** A broker that is alive but does not serve (SIGSTOPped, or its worker
//!   blocked in a callback) keeps its lock byte, so liveness is also a heartbeat: a serving
//!   broker stores CLOCK_MONOTONIC nanoseconds in the region header at least every 100 ms
//!   (a timer in its epoll set wakes it, also when idle or driven by an external poller).
//!   Every other worker that holds the region looks at it every 200 ms; one that finds it
//!   older than 700 ms swaps it (compare-and-swap from the stale value: one worker wins),
//!   claims the next epoch, binds a new socket and renames it over the socket path (a
//!   connecting client finds the old socket or the new one, never none), and serves without
//!   the lock byte, which it takes once the stuck broker lets go of it. So a stuck broker is
//!   replaced within 0.9 s of its last heartbeat, plus the takeover's own scheduling delay;
//!   a worker whose HELLO sat in the stuck broker's backlog gives up after 500 ms and
//!   reconnects to the new socket (measured: a worker killed and restarted while the broker
//!   is stopped is attached about 1 s after the stop). When the stuck broker runs again,
//!   its first control poll (its timer is due at once) finds the newer epoch: it steps down
//!   (fencing, below), closing its listener without unlinking the path (the new broker's),
//!   closing its connections (their workers reconnect to the new broker), releasing its
//!   lock byte; it serves nothing meanwhile. `All` and unique events never wait for it. A
//!   worker blocked in a callback for more than 700 ms while it is the broker therefore loses
//!   the role; the cost of the heartbeat is 10 wake-ups per second for the broker and 5 for
//!   every other worker, also when idle. On the socket transport there is no shared region
//!   to hold a heartbeat: a stuck broker stops every event and attach until it runs again or
//!   dies (then the usual election follows). Publishers keep their events meanwhile, within
//!   `max_queue_len` (beyond it `publish` fails), and clients whose HELLO is unanswered
//!   reconnect every 500 ms; nothing is lost silently, but nothing is bounded in time.
//! * **Lock file removed or replaced.** The locks live on the lock file's inode, so a
//!   `<listening>.lock` removed under a running deployment (an operator, a tmp cleaner)
//!   would let a new process lock a live worker id or the broker byte in a fresh file. The
//!   lock file is opened with `O_NOFOLLOW` and must be a regular file of our uid (or an
//!   allowed one) that not every user may write; the socket's directory must belong to us,
//!   root or an allowed uid, and be sticky if every user may write it. Every live process compares the path's
//!   device and inode with its open file every 200 ms, and before running for election
//!   (it does not run while they differ); on a difference it takes its locks (slot, region,
//!   broker) in the file at the path too, keeping the old one open, so new processes find
//!   the live ids taken ([`Error::WidInUse`]) and the broker byte and region held. HELLO
//!   carries the lock file's device and inode, and a broker refuses a worker whose lock file
//!   is not its own ([`Error::AttachRefused`] naming the lock file): a process that locked
//!   a live id in a fresh file before the live ones moved is refused by the broker. A socket file is replaced only when a `connect` to it is refused (and
//!   it belongs to our uid); a socket that still accepts connections is never unlinked
//!   (except by the takeover from a stuck broker above, atomically).
//! * **Unique events across a broker crash.** On shared memory the broker is not on their
//!   path: the publisher records the hash in the region's dedup table itself (a claim by
//!   compare-and-swap, safe for any number of concurrent publishers) and writes the event
//!   into the ring of one live worker, preferring workers other than itself; unique events
//!   flow while the broker is dead or frozen, never delivered twice. A publisher killed while
//!   recording a hash loses its event (and at most one concurrent event with the same hash).
//!   On the socket transport a publisher keeps each unique event until a broker acknowledges
//!   it and resends what is unacknowledged to the next broker; the broker acknowledges an
//!   event only once it is handed off (completely written into its target's socket, whose
//!   buffer then belongs to the receiver, or run by the broker's own callbacks), so an
//!   acknowledged event never dies with the broker. Its table is private, so a successor
//!   starts with an empty one: an event handed off whose acknowledgement had not reached
//!   its publisher is delivered again (at-least-once across a broker crash, counted in
//!   [`Stats::unique_resent`]; see [`Target::Unique`]). Across a receiver crash likewise:
//!   the broker keeps a copy of each unique event it wrote into a receiver's socket until
//!   the receiver acknowledges it, and routes the ones not acknowledged to another live
//!   worker when the receiver's connection ends (one the receiver ran in its last dispatch
//!   pass runs twice; counted in [`Stats::unique_rerouted`]).
//! * **Worker killed.** The others keep publishing. The rings keep the events for the dead
//!   slot; when its ring is full they wait in each publisher's backlog (`max_queue_len`), and
//!   beyond that they are dropped and counted (`Stats::lost_outbound`, and the successor gets
//!   a `lost` notice): `publish` never blocks or fails because of a dead peer. A restarted
//!   process with the same [`Wid`] re-attaches and resumes every ring where its predecessor
//!   committed: it gets the events queued for it, without duplicates. A message is marked
//!   consumed before its callbacks run, so a worker killed inside a callback loses that one
//!   message for its successor (at most once). Unique events go to live slots only (slot
//!   locks). What a killed publisher had not yet written into a ring (its private backlog) is
//!   gone with it; a message it was writing is invisible, and one it had streamed in part is
//!   discarded by its receivers, with a `lost` notice, when its successor starts a message.
//!   On the socket transport a receiver acknowledges the events it has dispatched (when it
//!   goes idle, when it writes anyway, or every 64 frames); what the broker had written into
//!   a killed receiver's socket and it never acknowledged is reported lost to its successor
//!   (see [`Lost`]: too high by what it dispatched after its last acknowledgement, never too
//!   low).
//! * **Graceful close.** [`Worker::close`] (and `Drop`, bounded to 50 ms) first hands the
//!   broker role over: it releases the broker lock, then closes the listener and every
//!   connection, so a successor is elected at once. Then it flushes, within the timeout,
//!   the ring backlogs for live peers and the unique events not yet acknowledged (as a client
//!   it stays connected, or re-attaches, for that; it never runs for election again). Backlogs
//!   for dead peers and whatever is left at the deadline are given up and counted in the
//!   rings (the receivers get `lost` notices); [`Error::Unflushed`] reports a timeout. Events
//!   in the closing worker's inbound rings stay there for a successor with the same id.
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

// Lints: `[lints]` in Cargo.toml (one place).

mod context;
mod control;
mod dedup;
mod divert;
mod error;
mod event;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz_api;
mod inspect;
mod layout;
mod log_limit;
mod message;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(feature = "mio")]
mod mio;
mod notify;
mod options;
mod region;
mod ring;
mod stats;
mod subs;
mod sync;
mod sys;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub mod tokio;
mod transport;
mod wire;
mod worker;

pub use context::Context;
pub use error::{Error, PublishError, Result};
pub use event::{
    Event, Lost, MAX_ORIGIN_HOST_LEN, MAX_UNIQUE_HASH_LEN, NewBroker, Payload, SYSTEM_SOURCE, Target, Wid,
};
pub use inspect::{DedupSnapshot, INSPECT_TIMEOUT, RingSnapshot, SlotSnapshot, Snapshot, inspect};
pub use options::{DEFAULT_RING_CAPACITY, DEFAULT_RINGS_BUDGET, MAX_PAYLOAD_LIMIT, MAX_WORKERS, Options, Transport};
pub use stats::{PeerStats, Stats};
pub use subs::SubscriptionId;
pub use worker::{Batch, Events, Worker};
