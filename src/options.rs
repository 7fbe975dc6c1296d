//! The `Options` builder and its validation.
//!
//! Validation happens in [`crate::worker::Events::new`] and uses the model library's messages
//! (`"max_payload_len" option is invalid`, ...), so configuration errors read the same as in
//! lua-resty-events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// Largest accepted `max_payload_len`: 16 MiB, as in the model library.
pub const MAX_PAYLOAD_LIMIT: usize = 16 * 1024 * 1024;
/// Largest number of worker slots. Bounded by the number of descriptors one `SCM_RIGHTS`
/// message can carry (253): the region memfd plus one eventfd per slot.
pub const MAX_WORKERS: u32 = 128;
/// Default data bytes of one ring (one ordered pair of slots) for deployments of up to 19
/// slots (workers plus the privileged agent): 16 workers use 16 x 16 x (128 KiB + 256 B) =
/// 32 MiB of rings. Larger deployments get smaller rings by default, so that all the rings
/// fit [`DEFAULT_RINGS_BUDGET`] (see [`Options::ring_capacity`]).
pub const DEFAULT_RING_CAPACITY: usize = 128 * 1024;
/// Bytes the rings of one region may take at default options: the default ring capacity is
/// halved from [`DEFAULT_RING_CAPACITY`] until `slots² x (capacity + 256 B)` fits this, down
/// to the 4 KiB minimum. 64 workers get 8 KiB rings (33 MiB of rings, a 37 MiB region instead
/// of 517 MiB); 78 slots or more get the minimum, which passes the budget from 108 slots on
/// (128 workers: 68 MiB of rings).
pub const DEFAULT_RINGS_BUDGET: usize = 48 << 20;
/// Smallest accepted `ring_capacity`.
const MIN_RING_CAPACITY: usize = 4096;

/// The default ring capacity of a region of `slots` slots (see [`DEFAULT_RINGS_BUDGET`]).
fn default_ring_capacity(slots: u32) -> usize {
    let rings = slots as usize * slots as usize;
    let mut cap = DEFAULT_RING_CAPACITY;
    while cap > MIN_RING_CAPACITY && rings * (cap + crate::layout::RING_HEADER_SIZE) > DEFAULT_RINGS_BUDGET {
        cap /= 2;
    }
    cap
}

/// Which transport carries events between processes.
///
/// # Examples
///
/// ```
/// use worker_events::{Options, Transport};
/// let opts = Options::new("/tmp/ev.sock").transport(Transport::SharedMemory);
/// assert_eq!(opts.get_transport(), Transport::SharedMemory);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// Shared memory when the broker can create it (memfd + mmap), unix sockets otherwise.
    /// The broker decides; every worker follows it (learned at attach). Setting
    /// `WORKER_EVENTS_DISABLE_SHM` in the environment makes the memfd creation fail, as a
    /// sandbox without memfd would.
    #[default]
    Auto,
    /// Per-pair SPSC rings in one memfd region, eventfd wake-ups.
    SharedMemory,
    /// The unix sockets alone: every event goes through the broker, with one bounded queue
    /// per destination, coalesced writes, and lost notices for what a full queue or a dead
    /// broker dropped.
    ///
    /// Bounds (ARCHITECTURE.md, section B): flow control holds a publishing worker back
    /// (its `publish` fails with `queue overflow`) while a receiver that keeps reading has
    /// 256 KiB queued at the broker; a destination queue holds at most 256 KiB + 1 MiB + one
    /// frame; a receiver that takes nothing for 1 s stops holding publishers back (what its
    /// queue cannot hold is reported lost); the queue of a slot without a connection for
    /// 10 s is dropped into a lost notice for its next holder. The broker closes a connection
    /// that sends no HELLO within 2 s, refuses new idle connections beyond 64 unattached
    /// ones, and refuses any that passes file descriptors.
    Socket,
}

/// Configuration shared by every process of one deployment.
///
/// Build it in the master process, pass it to [`crate::worker::Events::new`], fork.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use worker_events::{Events, Options};
/// let events = Events::new(
///     Options::new("unix:/tmp/myproxy-events.sock")
///         .workers(4)
///         .broker_id(0)
///         .unique_timeout(Duration::from_secs(5))
///         .max_queue_len(10_240)
///         .max_payload_len(64 * 1024),
/// )
/// .unwrap();
/// assert_eq!(events.options().listening(), std::path::Path::new("/tmp/myproxy-events.sock"));
/// ```
#[derive(Debug, Clone)]
pub struct Options {
    pub(crate) listening: PathBuf,
    pub(crate) workers: u32,
    pub(crate) broker_id: u32,
    pub(crate) unique_timeout: Duration,
    pub(crate) max_queue_len: usize,
    pub(crate) broadcast_capacity: Option<usize>,
    pub(crate) max_payload_len: usize,
    pub(crate) enable_privileged_agent: bool,
    pub(crate) transport: Transport,
    pub(crate) testing: bool,
    /// `None`: the default for the number of slots ([`DEFAULT_RINGS_BUDGET`]).
    pub(crate) ring_capacity: Option<usize>,
    pub(crate) unique_capacity: usize,
    pub(crate) allowed_uids: Vec<u32>,
    pub(crate) reload_generation: u64,
}

impl Options {
    /// Options with the model's defaults; `listening` is the control socket path (a `unix:`
    /// prefix is accepted and stripped). The lock file lives beside it at `<listening>.lock`.
    ///
    /// # Examples
    ///
    /// ```
    /// let o = worker_events::Options::new("unix:/run/p/events.sock");
    /// assert_eq!(o.listening(), std::path::Path::new("/run/p/events.sock"));
    /// assert_eq!(o.get_max_queue_len(), 10_240);
    /// ```
    pub fn new(listening: impl AsRef<Path>) -> Self {
        let raw = listening.as_ref();
        let listening = match raw.to_str().and_then(|s| s.strip_prefix("unix:")) {
            Some(stripped) => PathBuf::from(stripped),
            None => raw.to_path_buf(),
        };
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u32).min(MAX_WORKERS);
        Options {
            listening,
            workers,
            broker_id: 0,
            unique_timeout: Duration::from_secs(5),
            max_queue_len: 10_240,
            broadcast_capacity: None,
            max_payload_len: 64 * 1024,
            enable_privileged_agent: false,
            transport: Transport::Auto,
            testing: false,
            ring_capacity: None,
            unique_capacity: 65_536,
            allowed_uids: Vec::new(),
            reload_generation: 0,
        }
    }

    /// Number of worker slots, `Wid::Worker(0..n)`. Default: the number of CPUs.
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/tmp/s").workers(4).get_workers(), 4);
    /// ```
    pub fn workers(mut self, n: u32) -> Self {
        self.workers = n;
        self
    }

    /// The preferred broker (default 0). Any live worker takes over when it is gone.
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/tmp/s").broker_id(2).get_broker_id(), 2);
    /// ```
    pub fn broker_id(mut self, id: u32) -> Self {
        self.broker_id = id;
        self
    }

    /// How long a unique hash stays recorded (default 5 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let o = worker_events::Options::new("/tmp/s").unique_timeout(Duration::from_millis(500));
    /// assert_eq!(o.get_unique_timeout(), Duration::from_millis(500));
    /// ```
    pub fn unique_timeout(mut self, t: Duration) -> Self {
        self.unique_timeout = t;
        self
    }

    /// Bound of every private queue (default 10,240 events): the publisher's own queue (a
    /// full one makes `publish` fail with `queue overflow`) and the backlog kept per receiver
    /// when its ring is full (a full backlog drops the event and the receiver gets a `lost`
    /// notice). On the socket transport the publisher's own queue is also bounded by 64 MiB,
    /// and the broker's queues per destination are bounded in bytes instead (see
    /// [`Transport::Socket`]).
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/tmp/s").max_queue_len(16).get_max_queue_len(), 16);
    /// ```
    pub fn max_queue_len(mut self, n: usize) -> Self {
        self.max_queue_len = n;
        self
    }

    /// Largest event data in bytes (default 64 KiB, at most 16 MiB). Source, event name and
    /// headers do not count.
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/tmp/s").max_payload_len(10).get_max_payload_len(), 10);
    /// ```
    pub fn max_payload_len(mut self, n: usize) -> Self {
        self.max_payload_len = n;
        self
    }

    /// Data bytes of each worker's **broadcast ring** (power of two, 4 KiB..=64 MiB), or 0
    /// for none. Default: the per-pair rings' [`Options::ring_capacity`] when it is set, else
    /// [`DEFAULT_RING_CAPACITY`] (128 KiB), whatever the number of workers: the
    /// per-publisher topology of shared memory is **the default** (ARCHITECTURE.md,
    /// "Per-publisher topology"); 0 keeps the per-pair rings alone (the topology of earlier
    /// versions: one copy of each event per receiver, a region that grows with the square
    /// of the workers).
    ///
    /// With it, a worker writes each event once, into its own ring, and every other worker
    /// reads it there through its own cursor, so `publish(All)` costs about the same for 4
    /// workers as for 64, a burst costs one wake-up per sleeping receiver, and the region
    /// grows linearly with the workers (one such ring per worker). A receiver that falls a
    /// whole broadcast ring behind is not lapped: before overwriting what it has not read,
    /// the publisher copies that into the receiver's own pair ring and backlog
    /// (`ring_capacity` and `max_queue_len` as without it) and sends it the following events
    /// that way until it has caught up, then tells it to return to the broadcast ring. Order,
    /// no duplicates and the `lost` accounting are as without it. An event too large for a
    /// quarter of the broadcast ring (its largest record) goes the per-pair way to everyone.
    /// Part of the region's geometry: every process of a deployment must set the same value.
    /// Only the shared-memory transport uses it.
    ///
    /// Test hook: with `WORKER_EVENTS_BROADCAST=0` in the environment, a deployment that
    /// does not set this option gets no broadcast rings (the per-pair topology). CI runs the
    /// multi-process suites once more that way (`.ci/run`).
    ///
    /// ```
    /// let o = worker_events::Options::new("/tmp/s").broadcast_capacity(256 * 1024);
    /// assert_eq!(o.get_broadcast_capacity(), 256 * 1024);
    /// let pair_rings_only = worker_events::Options::new("/tmp/s").broadcast_capacity(0);
    /// assert_eq!(pair_rings_only.get_broadcast_capacity(), 0);
    /// ```
    pub fn broadcast_capacity(mut self, bytes: usize) -> Self {
        self.broadcast_capacity = Some(bytes);
        self
    }

    /// See [`Options::broadcast_capacity`].
    ///
    /// ```
    /// # if std::env::var_os("WORKER_EVENTS_BROADCAST").is_none() {
    /// use worker_events::Options;
    /// assert_eq!(Options::new("/s").get_broadcast_capacity(), 128 * 1024);
    /// assert_eq!(Options::new("/s").ring_capacity(16 * 1024).get_broadcast_capacity(), 16 * 1024);
    /// # }
    /// ```
    pub fn get_broadcast_capacity(&self) -> usize {
        self.broadcast_capacity.unwrap_or_else(|| {
            // The test hook documented on `broadcast_capacity`.
            if std::env::var_os("WORKER_EVENTS_BROADCAST").is_some_and(|v| v == "0") {
                0
            } else {
                self.ring_capacity.unwrap_or(DEFAULT_RING_CAPACITY)
            }
        })
    }

    /// Reserve a slot for the privileged agent (`Wid::PrivilegedAgent`), which receives
    /// "all" events like a worker.
    ///
    /// ```
    /// assert!(worker_events::Options::new("/tmp/s").enable_privileged_agent(true).get_enable_privileged_agent());
    /// ```
    pub fn enable_privileged_agent(mut self, on: bool) -> Self {
        self.enable_privileged_agent = on;
        self
    }

    /// Which transport to use (default [`Transport::Auto`]).
    ///
    /// ```
    /// use worker_events::{Options, Transport};
    /// assert_eq!(Options::new("/tmp/s").transport(Transport::Socket).get_transport(), Transport::Socket);
    /// ```
    pub fn transport(mut self, t: Transport) -> Self {
        self.transport = t;
        self
    }

    /// Testing mode: no sockets, no shared memory; `publish` runs the callbacks synchronously
    /// in the calling process, `wid` is `None`, unique events are not deduplicated.
    ///
    /// ```
    /// assert!(worker_events::Options::new("/tmp/s").testing(true).get_testing());
    /// ```
    pub fn testing(mut self, on: bool) -> Self {
        self.testing = on;
        self
    }

    /// Data bytes of each ring (power of two, 4 KiB..=64 MiB). Larger payloads still work:
    /// they are streamed through the ring in fragments.
    ///
    /// Default: [`DEFAULT_RING_CAPACITY`] (128 KiB) for up to 19 slots (workers plus the
    /// privileged agent), then halved until the region's `slots²` rings fit
    /// [`DEFAULT_RINGS_BUDGET`] (48 MiB): 32 workers get 32 KiB, 64 workers 8 KiB, 78 or more
    /// the 4 KiB minimum. A ring holds the events in flight to one receiver; what does not fit
    /// waits in the publisher's private backlog (`max_queue_len` events, nothing is lost while
    /// the receiver keeps dispatching), so smaller rings cost memory copies under bursts, not
    /// events. Two costs to weigh before setting it larger on many workers: the region
    /// grows with the square of the slots (64 workers at 128 KiB: 517 MiB), and a publisher
    /// killed with a full backlog loses that backlog (reported as `lost`). The value is part
    /// of the region's geometry: every process of a deployment must compute the same one
    /// (same `workers`, `enable_privileged_agent` and `ring_capacity`).
    ///
    /// ```
    /// use worker_events::Options;
    /// assert_eq!(Options::new("/tmp/s").ring_capacity(1 << 20).get_ring_capacity(), 1 << 20);
    /// assert_eq!(Options::new("/tmp/s").workers(16).get_ring_capacity(), 128 * 1024);
    /// assert_eq!(Options::new("/tmp/s").workers(64).get_ring_capacity(), 8 * 1024);
    /// ```
    pub fn ring_capacity(mut self, bytes: usize) -> Self {
        self.ring_capacity = Some(bytes);
        self
    }

    /// Capacity of the shared unique-event table in live hashes (default 65,536).
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/tmp/s").unique_capacity(1024).get_unique_capacity(), 1024);
    /// ```
    pub fn unique_capacity(mut self, n: usize) -> Self {
        self.unique_capacity = n;
        self
    }

    /// Also accept control-channel peers running as this uid (the broker's own uid is always
    /// accepted; anyone else is refused after an `SO_PEERCRED` check).
    ///
    /// ```
    /// let o = worker_events::Options::new("/tmp/s").allow_uid(33);
    /// assert_eq!(o.get_allowed_uids(), &[33]);
    /// ```
    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.allowed_uids.push(uid);
        self
    }

    /// The control socket path, `unix:` prefix stripped.
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/a/b").listening(), std::path::Path::new("/a/b"));
    /// ```
    pub fn listening(&self) -> &Path {
        &self.listening
    }

    /// The generation of workers this process belongs to (graceful reload). Default 0.
    ///
    /// **Reload model.** Each generation is its own deployment: its own control socket
    /// ([`Options::socket_path`]: `<listening>` for generation 0, `<listening>.gen<N>`
    /// otherwise), lock file, broker and shared region. During an nginx-style reload the
    /// master starts the new generation's workers with `generation(n + 1)` and the same
    /// worker ids while the old generation drains: no `WidInUse`, and each generation keeps
    /// exchanging events among its own workers. The generations do not see each other's
    /// events, as an old nginx worker keeps serving with the configuration it started with;
    /// an event meant for both (rare during a reload window) is published by a process of
    /// each. When the old generation has exited, [`Events::remove_files`] of its options
    /// removes its socket and lock file (`tests/reload.rs`).
    ///
    /// [`Events::remove_files`]: crate::worker::Events::remove_files
    ///
    /// ```
    /// let o = worker_events::Options::new("/run/p/ev.sock").generation(3);
    /// assert_eq!(o.get_generation(), 3);
    /// assert_eq!(o.socket_path(), std::path::Path::new("/run/p/ev.sock.gen3"));
    /// let o = worker_events::Options::new("/run/p/ev.sock");
    /// assert_eq!(o.socket_path(), std::path::Path::new("/run/p/ev.sock"));
    /// ```
    pub fn generation(mut self, generation: u64) -> Self {
        self.reload_generation = generation;
        self
    }

    /// See [`Options::generation`].
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/s").get_generation(), 0);
    /// ```
    pub fn get_generation(&self) -> u64 {
        self.reload_generation
    }

    /// The control socket this generation uses (see [`Options::generation`]); its lock file
    /// is `<socket_path>.lock`.
    ///
    /// ```
    /// let o = worker_events::Options::new("unix:/a/b").generation(1);
    /// assert_eq!(o.socket_path(), std::path::Path::new("/a/b.gen1"));
    /// ```
    pub fn socket_path(&self) -> PathBuf {
        if self.reload_generation == 0 {
            return self.listening.clone();
        }
        let mut s = self.listening.as_os_str().to_owned();
        s.push(format!(".gen{}", self.reload_generation));
        PathBuf::from(s)
    }
    /// See [`Options::workers`].
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/s").workers(3).get_workers(), 3);
    /// ```
    pub fn get_workers(&self) -> u32 {
        self.workers
    }
    /// See [`Options::broker_id`].
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/s").get_broker_id(), 0);
    /// ```
    pub fn get_broker_id(&self) -> u32 {
        self.broker_id
    }
    /// See [`Options::unique_timeout`].
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/s").get_unique_timeout().as_secs(), 5);
    /// ```
    pub fn get_unique_timeout(&self) -> Duration {
        self.unique_timeout
    }
    /// See [`Options::max_queue_len`].
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/s").get_max_queue_len(), 10_240);
    /// ```
    pub fn get_max_queue_len(&self) -> usize {
        self.max_queue_len
    }
    /// See [`Options::max_payload_len`].
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/s").get_max_payload_len(), 65_536);
    /// ```
    pub fn get_max_payload_len(&self) -> usize {
        self.max_payload_len
    }
    /// See [`Options::enable_privileged_agent`].
    ///
    /// ```
    /// assert!(!worker_events::Options::new("/s").get_enable_privileged_agent());
    /// ```
    pub fn get_enable_privileged_agent(&self) -> bool {
        self.enable_privileged_agent
    }
    /// See [`Options::transport`].
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/s").get_transport(), worker_events::Transport::Auto);
    /// ```
    pub fn get_transport(&self) -> Transport {
        self.transport
    }
    /// See [`Options::testing`].
    ///
    /// ```
    /// assert!(!worker_events::Options::new("/s").get_testing());
    /// ```
    pub fn get_testing(&self) -> bool {
        self.testing
    }
    /// The ring capacity in effect: the one set with [`Options::ring_capacity`], or the
    /// default for this many slots.
    ///
    /// ```
    /// let o = worker_events::Options::new("/s").workers(4);
    /// assert_eq!(o.get_ring_capacity(), 128 * 1024);
    /// assert_eq!(o.enable_privileged_agent(true).workers(40).get_ring_capacity(), 16 * 1024);
    /// ```
    pub fn get_ring_capacity(&self) -> usize {
        let slots = self.workers.saturating_add(u32::from(self.enable_privileged_agent));
        self.ring_capacity.unwrap_or_else(|| default_ring_capacity(slots))
    }
    /// See [`Options::unique_capacity`].
    ///
    /// ```
    /// assert_eq!(worker_events::Options::new("/s").get_unique_capacity(), 65_536);
    /// ```
    pub fn get_unique_capacity(&self) -> usize {
        self.unique_capacity
    }
    /// See [`Options::allow_uid`].
    ///
    /// ```
    /// assert!(worker_events::Options::new("/s").get_allowed_uids().is_empty());
    /// ```
    pub fn get_allowed_uids(&self) -> &[u32] {
        &self.allowed_uids
    }

    /// Check every option; the messages are the model library's where it has one.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |msg: &str| Err(Error::InvalidOption(msg.to_string()));
        if self.listening.as_os_str().is_empty() || self.listening.as_os_str().len() > 107 {
            return bad("\"listening\" option is invalid");
        }
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return bad("\"workers\" option is invalid");
        }
        if self.broker_id >= self.workers {
            return bad("\"broker_id\" option is invalid");
        }
        if self.unique_timeout.is_zero() {
            return bad("\"unique_timeout\" must be greater than 0");
        }
        if self.max_queue_len == 0 || self.max_queue_len > u32::MAX as usize {
            return bad("\"max_queue_len\" option is invalid");
        }
        if self.max_payload_len == 0 || self.max_payload_len > MAX_PAYLOAD_LIMIT {
            return bad("\"max_payload_len\" option is invalid");
        }
        let ring = self.get_ring_capacity();
        if !ring.is_power_of_two() || !(MIN_RING_CAPACITY..=64 * 1024 * 1024).contains(&ring) {
            return bad("\"ring_capacity\" option is invalid");
        }
        let b = self.get_broadcast_capacity();
        if b != 0 && (!b.is_power_of_two() || !(MIN_RING_CAPACITY..=64 * 1024 * 1024).contains(&b)) {
            return bad("\"broadcast_capacity\" option is invalid");
        }
        if self.unique_capacity == 0 || self.unique_capacity > (1 << 24) {
            return bad("\"unique_capacity\" option is invalid");
        }
        Ok(())
    }
}

/// The options every process of one deployment must share, compared by the broker at attach
/// (HELLO carries them; a worker whose options differ is refused with a reason naming each
/// differing option):
/// * `workers`, `enable_privileged_agent`, `ring_capacity`, `broadcast_capacity`,
///   `unique_capacity`: the geometry
///   of the shared region (slots, rings, dedup table); a region of another geometry cannot
///   be mapped;
/// * `max_payload_len`: a receiver with a smaller limit would drop larger events (and its
///   frame limit would cut the connection on the socket transport);
/// * `unique_timeout`: the dedup window is one rule for the whole deployment (every
///   publisher records its own unique hashes in the shared table with its expiry);
/// * `transport`: a worker that requires shared memory (or the sockets) is not attached to a
///   broker that runs the other one; `Auto` accepts either.
///
/// `max_queue_len`, `broker_id` and `allow_uid` are local to each process and may differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttachTerms {
    pub workers: u32,
    pub agent: bool,
    pub ring_capacity: u64,
    pub broadcast_capacity: u64,
    pub unique_capacity: u64,
    pub max_payload_len: u64,
    pub unique_timeout_ns: u64,
    pub transport: Transport,
}

impl Transport {
    /// Wire code in HELLO.
    pub(crate) fn code(self) -> u32 {
        match self {
            Transport::Auto => 0,
            Transport::SharedMemory => 1,
            Transport::Socket => 2,
        }
    }

    /// The transport of a wire code.
    pub(crate) fn from_code(code: u32) -> Option<Transport> {
        match code {
            0 => Some(Transport::Auto),
            1 => Some(Transport::SharedMemory),
            2 => Some(Transport::Socket),
            _ => None,
        }
    }
}

impl Options {
    /// The options this process must share with the broker (see [`AttachTerms`]).
    pub(crate) fn attach_terms(&self) -> AttachTerms {
        AttachTerms {
            workers: self.workers,
            agent: self.enable_privileged_agent,
            ring_capacity: self.get_ring_capacity() as u64,
            broadcast_capacity: self.get_broadcast_capacity() as u64,
            unique_capacity: self.unique_capacity as u64,
            max_payload_len: self.max_payload_len as u64,
            unique_timeout_ns: u64::try_from(self.unique_timeout.as_nanos()).unwrap_or(u64::MAX),
            transport: self.transport,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn msg(o: Options) -> String {
        o.validate().unwrap_err().to_string()
    }

    #[test]
    fn model_messages() {
        let o = || Options::new("/tmp/x.sock").workers(4);
        assert!(o().validate().is_ok());
        assert_eq!(msg(o().max_payload_len(0)), "\"max_payload_len\" option is invalid");
        assert_eq!(msg(o().max_payload_len(MAX_PAYLOAD_LIMIT + 1)), "\"max_payload_len\" option is invalid");
        assert!(o().max_payload_len(MAX_PAYLOAD_LIMIT).validate().is_ok());
        assert_eq!(msg(o().unique_timeout(Duration::ZERO)), "\"unique_timeout\" must be greater than 0");
        assert_eq!(msg(o().max_queue_len(0)), "\"max_queue_len\" option is invalid");
        assert_eq!(msg(o().broker_id(4)), "\"broker_id\" option is invalid");
        assert_eq!(msg(o().workers(0)), "\"workers\" option is invalid");
        assert_eq!(msg(o().workers(MAX_WORKERS + 1)), "\"workers\" option is invalid");
        assert_eq!(msg(Options::new("")), "\"listening\" option is invalid");
        assert_eq!(msg(Options::new("unix:")), "\"listening\" option is invalid");
        assert_eq!(msg(o().ring_capacity(5000)), "\"ring_capacity\" option is invalid");
        assert_eq!(msg(o().ring_capacity(1024)), "\"ring_capacity\" option is invalid");
        assert_eq!(msg(o().unique_capacity(0)), "\"unique_capacity\" option is invalid");
    }

    #[test]
    fn default_ring_capacity_keeps_the_rings_in_budget() {
        let mut last = DEFAULT_RING_CAPACITY;
        for workers in 1..=MAX_WORKERS {
            for agent in [false, true] {
                let o = Options::new("/tmp/x.sock").workers(workers).enable_privileged_agent(agent);
                assert!(o.validate().is_ok(), "{workers} workers");
                let (cap, slots) = (o.get_ring_capacity(), (workers + u32::from(agent)) as usize);
                let rings = slots * slots * (cap + crate::layout::RING_HEADER_SIZE);
                // In budget, or at the minimum; and never smaller than it needs to be.
                assert!(rings <= DEFAULT_RINGS_BUDGET || cap == MIN_RING_CAPACITY, "{slots} slots: {cap}");
                let doubled = slots * slots * (2 * cap + crate::layout::RING_HEADER_SIZE);
                assert!(cap == DEFAULT_RING_CAPACITY || doubled > DEFAULT_RINGS_BUDGET, "{slots} slots: {cap}");
                assert!(cap <= last, "not monotonic at {slots} slots");
                last = cap;
            }
        }
        let cap = |w| Options::new("/tmp/x.sock").workers(w).get_ring_capacity();
        assert_eq!(
            (cap(4), cap(16), cap(19), cap(20), cap(32), cap(64), cap(78)),
            (128 << 10, 128 << 10, 128 << 10, 64 << 10, 32 << 10, 8 << 10, 4 << 10)
        );
        // An explicit value wins, and is what the broker compares.
        let o = Options::new("/tmp/x.sock").workers(64).ring_capacity(1 << 20);
        assert_eq!((o.get_ring_capacity(), o.attach_terms().ring_capacity), (1 << 20, 1 << 20));
        assert_eq!(Options::new("/tmp/x.sock").workers(64).attach_terms().ring_capacity, 8 << 10);
    }

    #[test]
    fn unix_prefix_stripped() {
        assert_eq!(Options::new("unix:/a/b.sock").listening(), Path::new("/a/b.sock"));
        assert_eq!(Options::new("/a/b.sock").listening(), Path::new("/a/b.sock"));
    }
}
