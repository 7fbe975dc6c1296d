//! The public facade: [`Events`] (configuration, fork-safe) and [`Worker`] (one process's
//! participation). The worker's concerns each have a file: publishing (`publish.rs`),
//! bursts committed once (`batch.rs`), dispatch, wait and control pacing (`poll.rs`),
//! delivery to callbacks (`delivery.rs`), attach handling (`attach.rs`), the broker role
//! (`broker.rs`), unique events (`unique.rs`), and close (`close.rs`). The data path is one
//! [`DataPath`]: each public method asks it instead of branching on the transport.

mod attach;
mod batch;
mod broker;
mod close;
mod delivery;
mod handoff;
mod poll;
mod publish;
mod unique;

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use rkyv::ser::allocator::Arena;
use rkyv::util::AlignedVec;

use crate::context::Context;
use crate::control::Control;
use crate::divert::Patterns;
use crate::error::{Error, Result};
use crate::event::{Event, Wid};
use crate::layout::Geometry;
use crate::message;
use crate::options::{Options, Transport};
use crate::stats::{PeerStats, Stats};
use crate::subs::{SubscriptionId, Subscriptions};
use crate::sys::{self, Epoll};
use crate::transport::{DataPath, PreAttach};
use crate::wire::Peer;
use broker::BrokerView;
use handoff::Handoffs;
use poll::Pacing;
use unique::UniqueOutbox;

pub use batch::Batch;

/// The configuration of one deployment. Cheap and fork-safe: [`Events::new`] validates the
/// options and opens nothing, so it can run in the master before `fork()`; each process then
/// calls [`Events::init_worker`].
///
/// # Examples
///
/// ```
/// use worker_events::{Events, Options};
/// let events = Events::new(Options::new("/tmp/doc-events.sock").workers(2)).unwrap();
/// assert_eq!(events.options().get_workers(), 2);
/// let err = Events::new(Options::new("/tmp/doc-events.sock").workers(2).broker_id(2)).unwrap_err();
/// assert_eq!(err.to_string(), "\"broker_id\" option is invalid");
/// ```
#[derive(Debug, Clone)]
pub struct Events {
    opts: Arc<Options>,
}

impl Events {
    /// Validate `opts`.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] with the model library's message.
    pub fn new(opts: Options) -> Result<Events> {
        opts.validate()?;
        Ok(Events { opts: Arc::new(opts) })
    }

    /// The validated options.
    ///
    /// ```
    /// let e = worker_events::Events::new(worker_events::Options::new("/tmp/x.sock")).unwrap();
    /// assert_eq!(e.options().get_broker_id(), 0);
    /// ```
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Join as `wid`: take the slot's lock, then find the broker (or become it). Returns at
    /// once; attaching completes inside later [`Worker::dispatch`]/[`Worker::wait`] calls
    /// ([`Worker::is_ready`] tells when). Events published before that are kept and sent once
    /// attached; events published *to* this slot by others wait in its rings.
    ///
    /// # Errors
    /// [`Error::InvalidWid`] out of range, [`Error::WidInUse`] when another live process holds
    /// the id, [`Error::Io`] when the lock file, socket or shared region cannot be set up.
    ///
    /// # Examples
    ///
    /// ```
    /// use worker_events::{Events, Options, Wid};
    /// let dir = std::env::temp_dir().join(format!("we-doc-{}", std::process::id()));
    /// let events = Events::new(Options::new(dir.join("ev.sock")).workers(1)).unwrap();
    /// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert!(w.is_broker() && w.is_ready()); // the preferred broker elects itself at once
    /// assert!(events.init_worker(Wid::Worker(0)).is_err()); // the id is held
    /// assert!(events.init_worker(Wid::Worker(1)).is_err()); // out of range
    /// # drop(w); let _ = std::fs::remove_dir_all(dir);
    /// ```
    pub fn init_worker(&self, wid: Wid) -> Result<Worker> {
        self.init(wid)
    }

    /// Remove this deployment's control socket and lock file (at
    /// [`Options::socket_path`]) once no live process uses them: for a master, after a
    /// generation's workers have all exited (see [`Options::generation`]). Returns `false`,
    /// touching nothing, while any process still holds a worker id or the broker role there.
    ///
    /// # Errors
    /// [`Error::Io`] when the lock file cannot be opened or a file cannot be removed (a
    /// socket or lock file of another user is refused, never removed).
    ///
    /// # Examples
    ///
    /// ```
    /// use worker_events::{Events, Options, Wid};
    /// let dir = std::env::temp_dir().join(format!("we-doc-rm-{}", std::process::id()));
    /// let old = Events::new(Options::new(dir.join("ev.sock")).workers(1).generation(1)).unwrap();
    /// let w = old.init_worker(Wid::Worker(0)).unwrap();
    /// assert!(!old.remove_files().unwrap()); // generation 1 still runs
    /// drop(w);
    /// assert!(old.remove_files().unwrap());
    /// assert!(!dir.join("ev.sock.gen1").exists() && !dir.join("ev.sock.gen1.lock").exists());
    /// # let _ = std::fs::remove_dir_all(dir);
    /// ```
    pub fn remove_files(&self) -> Result<bool> {
        crate::control::remove_files(&self.opts.socket_path(), &self.opts.allowed_uids)
    }

    fn init(&self, wid: Wid) -> Result<Worker> {
        let o = &self.opts;
        let slot = match wid {
            Wid::Worker(i) if i < o.workers => i,
            Wid::Worker(_) => return Err(Error::InvalidWid { wid, reason: "outside 0..workers" }),
            Wid::PrivilegedAgent if o.enable_privileged_agent => o.workers,
            Wid::PrivilegedAgent => {
                return Err(Error::InvalidWid { wid, reason: "the privileged agent is not enabled" });
            }
        };
        let geo = Geometry::with_broadcast(
            o.workers,
            o.enable_privileged_agent,
            o.get_ring_capacity(),
            o.unique_capacity,
            o.get_broadcast_capacity(),
        );
        let epoll = Epoll::new().map_err(|e| Error::io("epoll_create1", e))?;
        let (path, ctl) = if o.testing {
            (DataPath::InProcess, None)
        } else {
            let max_frame = message::max_message_len(o.max_payload_len) + 1024;
            let preferred = wid == Wid::Worker(o.broker_id);
            let terms = o.attach_terms();
            let ctl = Control::new(&o.socket_path(), slot, geo, terms, preferred, o.allowed_uids.clone(), max_frame)?;
            (DataPath::Unattached(PreAttach::default()), Some(ctl))
        };
        let mut w = Worker {
            opts: self.opts.clone(),
            wid,
            slot,
            geo,
            subs: Subscriptions::default(),
            cx: Context::new(wid),
            cx_used: false,
            local: VecDeque::new(),
            unrun_self: 0,
            pool: Vec::new(),
            spare: None,
            arena: Arena::new(),
            stats: Stats::default(),
            path,
            ctl,
            epoll,
            pacing: Pacing::default(),
            pending_error: None,
            unique: UniqueOutbox::default(),
            divert: Patterns::default(),
            handoffs: Handoffs::default(),
            broker: BrokerView::default(),
            closed: false,
            forks: sys::forks(),
        };
        if w.ctl.is_some() {
            w.poll_control()?;
            if let Some(e) = w.pending_error.take() {
                return Err(e);
            }
        }
        Ok(w)
    }
}

/// One process's handle: subscribe, publish, dispatch. Single-threaded by design: callbacks
/// run on the caller's thread inside [`Worker::dispatch`] / [`Worker::wait`]; the library
/// starts no thread.
///
/// **`fork()`.** A worker belongs to the process that created it. Create workers after
/// forking (the prefork model: [`Events::new`] in the master, [`Events::init_worker`] in each
/// worker process). In a child forked (without `exec`) from a process that holds a worker,
/// the child's copy refuses to run: every call returns [`Error::Forked`]
/// ([`PublishError::Forked`](crate::error::PublishError::Forked) from `publish`, `false` from
/// `flush`), and dropping it touches nothing shared. The child does not keep the parent's
/// kernel state either: its copies of the lock file (the worker id, broker and region
/// locks), the broker's listening socket and the control connections are pointed at
/// `/dev/null` by a `pthread_atfork` handler, so a parent that dies frees its id and role at
/// once even while the child lives (`tests/fork.rs`). A child made by a raw `clone` system
/// call, not libc's `fork`, bypasses the handler.
///
/// `Worker` is [`AsFd`]: the descriptor (an epoll set over this slot's eventfd and the
/// control sockets) becomes readable when `dispatch` has work, **once `dispatch` has
/// returned 0** (as with `EAGAIN`, drain until 0 before going back to your poller; it works
/// level- and edge-triggered: each wake-up is a new edge). Events that arrive while the
/// worker is inside `dispatch`, or between calls while `dispatch` keeps finding events,
/// cost no syscall; a `dispatch` that finds nothing while a stream is flowing polls for up
/// to 20 µs before arming (see [`Worker::dispatch`]). In
/// [busy-poll mode](Worker::set_busy_poll) it is never armed and publishers make no syscall.
///
/// # Examples
///
/// ```
/// use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
/// use std::time::Duration;
/// use worker_events::{Events, Options, Target, Wid};
///
/// let dir = std::env::temp_dir().join(format!("we-doc-worker-{}", std::process::id()));
/// let events = Events::new(Options::new(dir.join("ev.sock")).workers(1)).unwrap();
/// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
/// let hits = Arc::new(AtomicUsize::new(0));
/// let h = hits.clone();
/// w.subscribe("healthcheck", "*", move |ev| {
///     assert_eq!(ev.wid(), Some(Wid::Worker(0)));
///     h.fetch_add(1, Ordering::Relaxed);
/// });
/// w.publish_bytes(Target::All, "healthcheck", "down", b"10.0.0.7").unwrap();
/// w.wait(Some(Duration::from_millis(100))).unwrap();
/// assert_eq!(hits.load(Ordering::Relaxed), 1);
/// # drop(w); let _ = std::fs::remove_dir_all(dir);
/// ```
pub struct Worker {
    opts: Arc<Options>,
    wid: Wid,
    slot: u32,
    geo: Geometry,
    subs: Subscriptions,
    /// What callbacks publish while they run (sent after each delivery pass).
    cx: Context,
    /// A callback that can publish was subscribed (until then no pass prepares `cx`).
    cx_used: bool,
    /// Events for our own callbacks ("all" self-copies, "current", unique events the broker
    /// gave itself, system notices), in publish order.
    local: VecDeque<AlignedVec>,
    /// Our own "all" events published since the last dispatch that matched no callback of
    /// ours at publish time: not queued, only counted (as delivered) by the next dispatch.
    unrun_self: usize,
    /// Spare message buffers (no allocation per event in steady state).
    pool: Vec<AlignedVec>,
    /// The spare buffer taken first and given back first (a small one): a publisher whose
    /// own copies go unrun reuses one buffer without a trip through `pool`.
    spare: Option<AlignedVec>,
    /// rkyv's serialization arena for `publish` (kept here rather than thread-local).
    arena: Arena,
    stats: Stats,
    // Drop order matters: the data path marks the slot detached before `ctl` releases the
    // slot lock (a successor may take the slot the moment the lock goes).
    path: DataPath,
    /// The control channel; `None` in testing mode.
    ctl: Option<Control>,
    epoll: Epoll,
    pacing: Pacing,
    pending_error: Option<Error>,
    unique: UniqueOutbox,
    /// The agent's unique-diversion patterns as last learned (see [`Worker::divert_unique`]).
    divert: Patterns,
    /// (socket broker) Unique events routed and not handed off yet.
    handoffs: Handoffs,
    broker: BrokerView,
    /// `close` has run (Drop does not run it again).
    closed: bool,
    /// `sys::forks()` when this worker was created: it differs in a `fork()` child, where
    /// every call refuses to run (the slot, locks and rings are the parent's).
    forks: u64,
}

impl Worker {
    /// Is this a `fork()` child's copy of a worker its parent created?
    fn forked(&self) -> bool {
        self.forks != sys::forks()
    }

    /// [`Error::Forked`] in a `fork()` child's copy.
    fn check_fork(&self) -> Result<()> {
        if self.forked() { Err(Error::Forked) } else { Ok(()) }
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("wid", &self.wid)
            .field("ready", &self.is_ready())
            .field("broker", &self.is_broker())
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Register `callback` for events matching `(source, event)`; `"*"` is a wildcard.
    /// Matching runs `("*","*")`, then `(source,"*")`, then `(source,event)`, each level in
    /// subscription order.
    ///
    /// A subscription sees events that arrive after it is made. For this worker's own
    /// `Target::All` events that means events published after it: whether the publisher's
    /// own copy is kept for its callbacks is decided at `publish` (a copy no callback wants
    /// is not queued, only counted as delivered by the next dispatch), so an event published
    /// just before a `subscribe` in the same process is not delivered to the new callback.
    /// A subscription that exists at `publish` time gets the event, in publish order with
    /// this worker's `Target::Current` events.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// let id = w.subscribe("cache", "purge", |ev| println!("purge {:?}", ev.data_bytes()));
    /// # let _ = id;
    /// ```
    pub fn subscribe<F>(&mut self, source: &str, event: &str, callback: F) -> SubscriptionId
    where
        F: FnMut(&Event<'_>) + Send + 'static,
    {
        let mut callback = callback;
        self.subs.subscribe(source, event, Box::new(move |_: &mut Context, ev: &Event<'_>| callback(ev)))
    }

    /// [`Worker::subscribe`] for a callback that publishes: it also gets a [`Context`], whose
    /// `publish` and `publish_bytes` are checked at the call (with the errors of
    /// [`Worker::publish`]) and sent, in call order, right after the delivery pass that ran
    /// the callback. This worker's own callbacks see those events at a later pass, never
    /// within the run that published them.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.subscribe_with("cache", "set", |cx, ev| {
    ///     cx.publish_bytes(Target::All, "cache", "changed", ev.data_bytes()).unwrap();
    /// });
    /// let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    /// let s = seen.clone();
    /// w.subscribe("cache", "changed", move |ev| s.lock().unwrap().push(ev.data_bytes().to_vec()));
    /// w.publish_bytes(Target::Current, "cache", "set", b"k1").unwrap(); // testing mode: runs at once
    /// assert_eq!(*seen.lock().unwrap(), [b"k1".to_vec()]);
    /// ```
    pub fn subscribe_with<F>(&mut self, source: &str, event: &str, callback: F) -> SubscriptionId
    where
        F: FnMut(&mut Context, &Event<'_>) + Send + 'static,
    {
        self.cx_used = true;
        self.subs.subscribe(source, event, Box::new(callback))
    }

    /// Remove a subscription; false for an unknown id.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// let id = w.subscribe("*", "*", |_| {});
    /// assert!(w.unsubscribe(id));
    /// ```
    pub fn unsubscribe(&mut self, id: SubscriptionId) -> bool {
        self.subs.unsubscribe(id)
    }

    /// Attached to a broker (or is the broker); always true in testing mode.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert!(w.is_ready());
    /// ```
    pub fn is_ready(&self) -> bool {
        match &self.ctl {
            None => true,
            Some(c) => self.path.transport().is_some() && (c.is_broker() || c.is_attached_client()),
        }
    }

    /// This process currently serves the control socket.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert!(!w.is_broker());
    /// ```
    pub fn is_broker(&self) -> bool {
        self.ctl.as_ref().is_some_and(|c| c.is_broker())
    }

    /// This worker's id.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert_eq!(w.wid(), Wid::Worker(0));
    /// ```
    pub fn wid(&self) -> Wid {
        self.wid
    }

    /// The transport in use, as decided by the broker and learned at attach:
    /// [`Transport::SharedMemory`] or [`Transport::Socket`]; [`Transport::Auto`] while not
    /// decided yet (before the first attach or election, and always in testing mode).
    ///
    /// ```
    /// # use worker_events::{Events, Options, Transport, Wid};
    /// let dir = std::env::temp_dir().join(format!("we-doc-transport-{}", std::process::id()));
    /// let opts = Options::new(dir.join("ev.sock")).workers(1).transport(Transport::Socket);
    /// let w = Events::new(opts).unwrap().init_worker(Wid::Worker(0)).unwrap();
    /// assert_eq!(w.transport(), Transport::Socket); // the preferred broker elected itself
    /// # drop(w); let _ = std::fs::remove_dir_all(dir);
    /// ```
    pub fn transport(&self) -> Transport {
        self.path.transport().unwrap_or(Transport::Auto)
    }

    /// Busy-poll mode: `dispatch` never arms the wake-up, so publishers make no syscall for
    /// this worker while it spins; `wait` still sleeps properly. Off by default.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.set_busy_poll(true);
    /// ```
    pub fn set_busy_poll(&mut self, on: bool) {
        self.pacing.busy_poll = on;
    }

    /// A snapshot of this worker's counters and per-peer queue depths.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert_eq!(w.stats().published, 0);
    /// ```
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.overflows += self.cx.overflows;
        self.unique_stats(&mut s);
        delivery::fold_counters(&mut s, self.path.counters());
        let broker = self.broker.slot.unwrap_or(0);
        s.peers = self
            .path
            .depths()
            .into_iter()
            .map(|d| PeerStats {
                wid: self.geo.wid_of(match d.peer {
                    Peer::Slot(s) => s,
                    Peer::Broker => broker,
                }),
                outbound_depth: d.outbound,
                backlog: d.backlog,
                inbound_depth: d.inbound,
            })
            .collect();
        s
    }
}

impl AsFd for Worker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

impl AsRawFd for Worker {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_fd().as_raw_fd()
    }
}
