//! The public value types: [`Wid`], [`Target`], [`Event`], [`Lost`], [`NewBroker`] and
//! [`Payload`]. Their wire format is in `message.rs`.

use std::fmt;

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;

use crate::error::Error;
use crate::message::Ext;

/// Identity of a participating process.
///
/// # Examples
///
/// ```
/// use worker_events::Wid;
/// assert_eq!(Wid::Worker(3).to_string(), "worker 3");
/// assert_eq!(Wid::PrivilegedAgent.to_string(), "privileged agent");
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Wid {
    /// Worker slot `n`, `0..workers`.
    Worker(u32),
    /// The privileged agent (needs `enable_privileged_agent(true)`).
    PrivilegedAgent,
}

impl fmt::Display for Wid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wid::Worker(n) => write!(f, "worker {n}"),
            Wid::PrivilegedAgent => f.write_str("privileged agent"),
        }
    }
}

/// Where an event goes.
///
/// # Examples
///
/// ```
/// use worker_events::Target;
/// let t = Target::Unique("purge:k1");
/// assert!(matches!(t, Target::Unique(h) if h == "purge:k1"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target<'a> {
    /// Every worker, the publisher included, and the privileged agent when enabled.
    All,
    /// Only the publishing process; never crosses a process boundary.
    Current,
    /// Exactly one live worker (never the privileged agent, which is not a worker, unless
    /// it published the event and no worker is alive); further events with the same hash within
    /// `unique_timeout` are dropped.
    ///
    /// Across a broker crash: on shared memory the publisher records the hash in the
    /// region's table itself, so an event is never delivered twice. On the socket transport
    /// the publisher keeps the event until the broker acknowledges it, which it does only
    /// once the event is handed off (written into its target's socket, or run by the broker
    /// itself): nothing acknowledged is lost with the broker, but an event handed off whose
    /// acknowledgement had not reached the publisher when the broker died is resent to the
    /// next broker, whose dedup table starts empty, and delivered again: at-least-once
    /// across a broker crash ([`crate::stats::Stats::unique_resent`] counts the resent events).
    /// Across a receiver crash too: the socket broker keeps a copy of each unique event it
    /// wrote into a receiver's socket until the receiver acknowledges having dispatched it,
    /// and routes it to another live worker (or runs it itself) if the receiver's
    /// connection ends first; one the receiver ran in its last dispatch pass, before its
    /// acknowledgement left, runs twice ([`crate::stats::Stats::unique_rerouted`] counts
    /// the rerouted events). Exactly-once otherwise. See ARCHITECTURE.md (G3).
    Unique(&'a str),
}

/// Reserved source of the events this crate emits itself.
pub const SYSTEM_SOURCE: &str = "worker-events";
/// Longest accepted unique hash, in bytes.
pub const MAX_UNIQUE_HASH_LEN: usize = 256;
/// Longest accepted origin host name ([`Event::origin_host`]), in bytes.
pub const MAX_ORIGIN_HOST_LEN: usize = 255;

/// Data of the `("worker-events", "lost")` notice: `count` events from `publisher` could not
/// be delivered to this process (a queue overflowed, or a partial message from a crashed
/// publisher was discarded). Resynchronize whatever state those events maintain.
///
/// A worker that takes over the id of a killed one is told, this way, of the events its
/// predecessor was sent and never dispatched. On the socket transport that count can be
/// too high, never too low: by the events the predecessor dispatched after its last
/// acknowledgement to the broker (fewer than 64 more than the dispatch pass during which it
/// died; none if it died idle). See ARCHITECTURE.md (G2).
///
/// # Examples
///
/// ```
/// use worker_events::{Lost, Wid};
/// let l = Lost { count: 3, publisher: Wid::Worker(1) };
/// assert_eq!(l.count, 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Lost {
    /// How many events were lost.
    pub count: u64,
    /// Who published them.
    pub publisher: Wid,
}

/// Data of the `("worker-events", "broker")` notice: a new broker was elected after this
/// worker had been attached to a previous one (a failover). Every worker that was attached
/// gets it once per failover, when it has re-attached to the new broker (the new broker
/// itself when it takes over); the event's [`Event::wid`] is the new broker too. Unique
/// events this worker published meanwhile are resent to the new broker.
///
/// # Examples
///
/// ```
/// use worker_events::{NewBroker, Wid};
/// let b = NewBroker { broker: Wid::Worker(2), epoch: 7 };
/// assert_eq!((b.broker, b.epoch), (Wid::Worker(2), 7));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NewBroker {
    /// The worker that now serves the control socket.
    pub broker: Wid,
    /// Its election epoch (one more at every election; a fencing token: a broker that
    /// finds a newer epoch in shared memory steps down).
    pub epoch: u64,
}

/// A value that can be published with [`crate::worker::Worker::publish`]: anything rkyv can
/// serialize (derive `rkyv::Archive` and `rkyv::Serialize`).
pub trait Payload: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>> {}
impl<T> Payload for T where T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>> {}

/// One delivered event, borrowed for the duration of a callback.
///
/// The data was copied out of shared memory before the callback runs; typed access
/// validates it (rkyv `bytecheck`), so a corrupt or hostile payload is an `Err`, never UB.
///
/// # Examples
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use worker_events::{Events, Options, Target, Wid};
/// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
/// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let s = seen.clone();
/// w.subscribe("cfg", "*", move |ev| {
///     let n: u64 = ev.deserialize().unwrap();
///     s.lock().unwrap().push((ev.source().to_string(), ev.event().to_string(), n, ev.wid()));
/// });
/// w.publish(Target::All, "cfg", "version", &42u64).unwrap();
/// assert_eq!(*seen.lock().unwrap(), vec![("cfg".into(), "version".into(), 42, None)]);
/// ```
#[derive(Clone, Copy)]
pub struct Event<'a> {
    pub(crate) source: &'a str,
    pub(crate) event: &'a str,
    pub(crate) data: &'a [u8],
    pub(crate) wid: Option<Wid>,
    /// The origin host of a relayed event, or the hash of a unique event diverted to the agent.
    pub(crate) ext: Ext<'a>,
}

impl<'a> Event<'a> {
    /// The source given to `publish`.
    pub fn source(&self) -> &'a str {
        self.source
    }
    /// The event name given to `publish`.
    pub fn event(&self) -> &'a str {
        self.event
    }
    /// The originating process; `None` for `Target::Current` events and in testing mode.
    pub fn wid(&self) -> Option<Wid> {
        self.wid
    }
    /// The raw data bytes (what `publish_bytes` sent, or the rkyv bytes of a typed value).
    /// 16-byte aligned.
    pub fn data_bytes(&self) -> &'a [u8] {
        self.data
    }
    /// Validated zero-copy access to a typed payload.
    ///
    /// # Errors
    /// [`Error::Decode`] when the bytes are not a valid archive of `T`.
    pub fn data<T>(&self) -> Result<&'a T::Archived, Error>
    where
        T: rkyv::Archive,
        T::Archived: for<'b> rkyv::bytecheck::CheckBytes<HighValidator<'b, rancor::Error>>,
    {
        rkyv::access::<T::Archived, rancor::Error>(self.data).map_err(|e| Error::Decode(e.to_string()))
    }
    /// Validate and deserialize a typed payload.
    ///
    /// # Errors
    /// [`Error::Decode`] when the bytes are not a valid archive of `T`.
    pub fn deserialize<T>(&self) -> Result<T, Error>
    where
        T: rkyv::Archive,
        T::Archived: for<'b> rkyv::bytecheck::CheckBytes<HighValidator<'b, rancor::Error>>
            + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
    {
        let archived = self.data::<T>()?;
        rkyv::deserialize::<T, rancor::Error>(archived).map_err(|e| Error::Decode(e.to_string()))
    }
    /// The host a bridge relayed this event from (the name given to
    /// [`Worker::publish_relayed`](crate::worker::Worker::publish_relayed) or
    /// [`Worker::report_relayed_lost`](crate::worker::Worker::report_relayed_lost)); `None` for an event
    /// published on this host.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    /// let s = seen.clone();
    /// w.subscribe("cfg", "*", move |ev| s.lock().unwrap().push(ev.origin_host().map(str::to_owned)));
    /// w.publish_bytes(Target::All, "cfg", "local", b"1").unwrap();
    /// w.publish_relayed("host-b", Target::All, "cfg", "remote", b"2").unwrap();
    /// assert_eq!(*seen.lock().unwrap(), [None, Some("host-b".to_owned())]);
    /// ```
    pub fn origin_host(&self) -> Option<&'a str> {
        match self.ext {
            Ext::OriginHost(h) => Some(h),
            _ => None,
        }
    }
    /// For a unique event diverted to the privileged agent (see
    /// [`Worker::divert_unique`](crate::worker::Worker::divert_unique)), its hash; `None` for every
    /// other event (a unique event routed to a worker as usual included).
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.subscribe("cache", "purge", |ev| assert_eq!(ev.unique_hash(), None));
    /// w.publish_bytes(Target::Unique("k1"), "cache", "purge", b"").unwrap();
    /// ```
    pub fn unique_hash(&self) -> Option<&'a str> {
        match self.ext {
            Ext::UniqueHash(h) => Some(h),
            _ => None,
        }
    }
    /// For a `("worker-events", "lost")` notice, its contents.
    pub fn lost(&self) -> Option<Lost> {
        if self.source == SYSTEM_SOURCE && self.event == "lost" { self.deserialize::<Lost>().ok() } else { None }
    }
    /// For a `("worker-events", "broker")` notice (a new broker was elected), its contents.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.subscribe("worker-events", "broker", |ev| {
    ///     let b = ev.new_broker().unwrap();
    ///     println!("{} is the broker now (epoch {})", b.broker, b.epoch);
    /// });
    /// ```
    pub fn new_broker(&self) -> Option<NewBroker> {
        if self.source == SYSTEM_SOURCE && self.event == "broker" { self.deserialize::<NewBroker>().ok() } else { None }
    }
}

impl fmt::Debug for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("source", &self.source)
            .field("event", &self.event)
            .field("wid", &self.wid)
            .field("ext", &self.ext)
            .field("data_len", &self.data.len())
            .finish()
    }
}
