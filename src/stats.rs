//! Counters a worker keeps about itself, returned by [`crate::worker::Worker::stats`].

use crate::event::Wid;

/// A snapshot of a worker's counters.
///
/// # Examples
///
/// ```
/// use worker_events::{Events, Options, Target, Wid};
/// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
/// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
/// w.subscribe("*", "*", |_| {});
/// w.publish_bytes(Target::All, "s", "e", b"x").unwrap();
/// let st = w.stats();
/// assert_eq!((st.published, st.delivered), (1, 1));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Successful `publish`/`publish_bytes` calls.
    pub published: u64,
    /// Events handed to this worker's callbacks (each counted once, however many callbacks).
    pub delivered: u64,
    /// Callback invocations.
    pub callbacks_run: u64,
    /// Callbacks that panicked (caught and logged).
    pub callback_panics: u64,
    /// Received messages refused as malformed, or ring records refused as corrupt.
    pub dropped: u64,
    /// Events reported lost to this worker through `lost` notices.
    pub lost: u64,
    /// Events this worker had to drop for a peer whose queue was full, or (a socket broker)
    /// that a peer was sent and never dispatched before its connection ended (the peer, or
    /// its successor, is told).
    pub lost_outbound: u64,
    /// `publish` calls refused with `queue overflow`.
    pub overflows: u64,
    /// Parked peers this worker woke (each a `parked` flag it claimed after a commit).
    pub wakeups_sent: u64,
    /// Eventfd writes those wake-ups took: one per woken peer, or one write of the group's
    /// fan-out eventfd when a commit woke three or more (every worker's epoll set holds it,
    /// so one write wakes every sleeper; see the crate docs' architecture).
    pub wake_writes: u64,
    /// Times this worker was woken by a publisher that claimed its `parked` flag (through its
    /// own eventfd or the fan-out one).
    pub wakeups_received: u64,
    /// (shared memory with broadcast rings, the default) Times a receiver fell a whole
    /// broadcast ring behind this worker and was diverted to its pair ring (its events then
    /// cost this worker one copy each until it caught up).
    pub diverts: u64,
    /// Times such a receiver, caught up, was told to read the broadcast ring again.
    pub resumes: u64,
    /// Times this worker lost its broker after having been attached (or, as the broker,
    /// stepped down because a newer one was elected: fencing).
    pub failovers: u64,
    /// Unique events dropped because their hash was seen within `unique_timeout`. On shared
    /// memory every publisher records its own unique events in the shared table, and this is
    /// the region-wide count (every attached worker reports the same figure, kept across
    /// broker failovers); on the socket transport, the broker's own count.
    pub unique_duplicates: u64,
    /// Unique events delivered without being recorded: the table window was full (a later
    /// event with the same hash may be delivered again). Region-wide on shared memory, the
    /// broker's on the socket transport, as `unique_duplicates`.
    pub unique_unrecorded: u64,
    /// Unique events published and not yet handed on: waiting to attach, or (socket
    /// transport) not yet acknowledged by a broker.
    pub unique_pending: u64,
    /// Unique events this worker diverted to the privileged agent (see
    /// [`Worker::divert_unique`](crate::worker::Worker::divert_unique)): on shared memory
    /// the publisher counts its own, on the socket transport the broker counts those it routed.
    pub unique_diverted: u64,
    /// Unique events that matched the agent's diversion patterns but were routed on this host
    /// as usual because the agent was not attached (availability first), counted as
    /// `unique_diverted` is.
    pub unique_not_diverted: u64,
    /// (socket transport) Unique events this worker sent again to a new broker because the
    /// one it had sent them to was lost before acknowledging them. The old broker may have
    /// handed some of them off already (it acknowledges an event once it is written to its
    /// target, and died before the acknowledgement came through): each resent event may be
    /// delivered twice (at-least-once across a broker crash; ARCHITECTURE.md §G3).
    pub unique_resent: u64,
    /// (socket transport, the broker) Unique events this broker had written into a
    /// receiver's socket and routed again to another worker (or ran itself) because the
    /// receiver's connection ended before the receiver acknowledged them (killed, or
    /// disconnected: it had not dispatched them, or had not yet said so). Each may have run
    /// on the receiver already, in its last dispatch pass: at-least-once across a receiver
    /// crash (ARCHITECTURE.md §G3). Not counted here: unique events rerouted because their
    /// target did not take them within the hand-off timeout (never written, they run once).
    pub unique_rerouted: u64,
    /// (socket transport, the broker) Unique events written to a receiver of which this
    /// broker stopped keeping a copy before the receiver acknowledged them: the copies kept
    /// per connection are bounded (4 MiB plus two frames of the largest size, and 65,536
    /// events), which only a receiver that does not acknowledge what it dispatches exceeds.
    /// Such an event is not routed again if its receiver dies (logged once per slot). Also
    /// counted here: the copies of a dead receiver's unacknowledged unique events a broker
    /// still held when it stopped serving (fenced, or closing), which it can no longer
    /// route (logged).
    pub unique_unguarded: u64,
    /// Per-peer queue state (empty until attached).
    pub peers: Vec<PeerStats>,
    /// Inbound rings found holding an impossible record or position (shared memory
    /// overwritten, or a buggy or hostile peer): each is reported once (this counter, a
    /// `lost` notice and a log line), then treated as empty until its producer writes again;
    /// also counted when a ring's positions had to be resynchronized at attach.
    pub corrupt_rings: u64,
}

/// Queue state between this worker and one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerStats {
    /// The peer.
    pub wid: Wid,
    /// Events from us not yet consumed by the peer (its ring plus our private backlog).
    pub outbound_depth: u64,
    /// Of which waiting in our private backlog because the ring was full.
    pub backlog: u64,
    /// Events from the peer waiting in our inbound ring.
    pub inbound_depth: u64,
}
