//! The public facade: [`Events`] (configuration, fork-safe) and [`Worker`] (one process's
//! participation: subscriptions, publish, dispatch).

mod failover;

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rkyv::util::AlignedVec;

use crate::control::{Control, CtlEvent, HandOut, Mode, STAMP_LEN, ShmWelcome, Stamp, TOKEN_EVENTFD, TOKEN_LISTENER};
use crate::dedup::{Check, HeapTable};
use crate::error::{Error, PublishError, Result};
use crate::event::{Event, Lost, MAX_UNIQUE_HASH_LEN, Payload, SYSTEM_SOURCE, Target, Wid};
use crate::layout::Geometry;
use crate::message::{self, Kind, ORIGIN_NONE};
use crate::options::{Options, Transport};
use crate::region::Region;
use crate::stats::{PeerStats, Stats};
use crate::subs::{SubscriptionId, Subscriptions};
use crate::sync::Ordering;
use crate::sys::{Epoll, EventFd};
use crate::transport::shm::{Incoming, ShmPort};
use crate::wire::frame::kind;

/// Dispatch calls between two looks at the clock while busy-polling.
const CONTROL_EVERY: u32 = 256;
/// While busy (never sleeping in `wait`), look at the control sockets at most this often:
/// one `epoll_wait(0)`, and the control work only if a control socket is ready.
const CONTROL_INTERVAL: Duration = Duration::from_millis(1);
/// Messages taken from one ring per dispatch, so one busy peer cannot starve the others.
const RING_BUDGET: usize = 4096;

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
        let o = &self.opts;
        let slot = match wid {
            Wid::Worker(i) if i < o.workers => i,
            Wid::Worker(_) => return Err(Error::InvalidWid { wid, reason: "outside 0..workers" }),
            Wid::PrivilegedAgent if o.enable_privileged_agent => o.workers,
            Wid::PrivilegedAgent => {
                return Err(Error::InvalidWid { wid, reason: "the privileged agent is not enabled" });
            }
        };
        let geo = Geometry::new(o.workers, o.enable_privileged_agent, o.ring_capacity, o.unique_capacity);
        let epoll = Epoll::new().map_err(|e| Error::io("epoll_create1", e))?;
        let ctl = if o.testing {
            None
        } else {
            let max_frame = message::max_message_len(o.max_payload_len) + 1024;
            let preferred = wid == Wid::Worker(o.broker_id);
            Some(Control::new(&o.listening, slot, geo, preferred, o.allowed_uids.clone(), max_frame, o.max_queue_len)?)
        };
        let mut w = Worker {
            opts: self.opts.clone(),
            wid,
            slot,
            geo,
            subs: Subscriptions::default(),
            local: VecDeque::new(),
            pool: Vec::new(),
            pre_attach: VecDeque::new(),
            stats: Stats::default(),
            port: None,
            ctl,
            epoll,
            epoch: 0,
            last_control: Instant::now(),
            busy_poll: false,
            countdown: 0,
            tokens: Vec::new(),
            pending_error: None,
            unique_out: VecDeque::new(),
            unique_sent: 0,
            next_unique_id: 0,
            broker_slot: None,
            unique_rr: 0,
            heap_dedup: None,
            incarnation: crate::sys::random_u64() | 1,
            out_seq: 0,
            in_seq: vec![(0, 0); geo.slots as usize],
            seen_broker: None,
            closed: false,
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
/// `Worker` is [`AsFd`]: the descriptor (an epoll set over this slot's eventfd and the
/// control sockets) becomes readable when `dispatch` has work, **once `dispatch` has
/// returned 0** (as with `EAGAIN`, drain until 0 before going back to your poller). In
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
    /// Events for our own callbacks ("all" self-copies and "current"), in publish order.
    local: VecDeque<AlignedVec>,
    /// Spare message buffers (no allocation per event in steady state).
    pool: Vec<AlignedVec>,
    /// "all" events published before we attached (bounded by max_queue_len).
    pre_attach: VecDeque<AlignedVec>,
    stats: Stats,
    // Drop order matters: the port marks the slot detached before `ctl` releases the slot
    // lock (a successor may take the slot the moment the lock goes).
    port: Option<ShmPort>,
    ctl: Option<Control>,
    epoll: Epoll,
    epoch: u64,
    last_control: Instant,
    busy_poll: bool,
    countdown: u32,
    tokens: Vec<u64>,
    pending_error: Option<Error>,
    /// Unique events not yet acknowledged by a broker, in publish order.
    unique_out: VecDeque<UniqueOut>,
    /// How many of `unique_out` were sent on the current broker connection.
    unique_sent: usize,
    next_unique_id: u64,
    /// Slot of the broker we are attached to.
    broker_slot: Option<u32>,
    /// (broker) Round-robin cursor for unique targets.
    unique_rr: u32,
    /// (broker, socket transport) The dedup table, in private memory.
    heap_dedup: Option<HeapTable>,
    /// (socket transport) This Worker's publisher id in stamps: random, nonzero.
    incarnation: u64,
    /// (socket transport) Sequence number of our next "all" event.
    out_seq: u64,
    /// (socket transport) Per publisher slot: (incarnation, next expected sequence number);
    /// incarnation 0 = nothing seen yet.
    in_seq: Vec<(u64, u64)>,
    /// (region id, broker epoch) of the last broker seen (the `broker` notice).
    seen_broker: Option<(u64, u64)>,
    /// `close` has run (Drop does not run it again).
    closed: bool,
}

struct UniqueOut {
    id: u64,
    hash: Box<str>,
    msg: AlignedVec,
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

    /// Publish a typed value (serialized once with rkyv, whatever the number of receivers).
    ///
    /// # Errors
    /// [`PublishError::PayloadTooLarge`] when the archived value exceeds `max_payload_len`,
    /// [`PublishError::QueueOverflow`] when this worker's own queue is full. Nothing was
    /// delivered anywhere when an error is returned.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.publish(Target::All, "config", "version", &42u32).unwrap();
    /// ```
    pub fn publish<T: Payload>(
        &mut self,
        target: Target<'_>,
        source: &str,
        event: &str,
        data: &T,
    ) -> Result<(), PublishError> {
        let (origin, kind) = self.route(target)?;
        let mut buf = self.pool.pop().unwrap_or_default();
        if let Err(e) = message::encode_typed(&mut buf, source, event, data, origin, kind, self.opts.max_payload_len) {
            self.pool.push(buf);
            return Err(e);
        }
        self.send(buf, target)
    }

    /// Publish raw bytes.
    ///
    /// # Errors
    /// As [`Worker::publish`].
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid, PublishError};
    /// let events = Events::new(Options::new("/tmp/unused.sock").testing(true).max_payload_len(4)).unwrap();
    /// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.publish_bytes(Target::Current, "crud", "routes", b"1234").unwrap();
    /// let err = w.publish_bytes(Target::Current, "crud", "routes", b"12345").unwrap_err();
    /// assert_eq!(err.to_string(), "failed to publish event: payload exceeds the limitation (4)");
    /// ```
    pub fn publish_bytes(
        &mut self,
        target: Target<'_>,
        source: &str,
        event: &str,
        data: &[u8],
    ) -> Result<(), PublishError> {
        let (origin, kind) = self.route(target)?;
        let mut buf = self.pool.pop().unwrap_or_default();
        if let Err(e) = message::encode_bytes(&mut buf, source, event, data, origin, kind, self.opts.max_payload_len) {
            self.pool.push(buf);
            return Err(e);
        }
        self.send(buf, target)
    }

    fn route(&self, target: Target<'_>) -> Result<(u32, Kind), PublishError> {
        match target {
            Target::All if self.opts.testing => Ok((ORIGIN_NONE, Kind::All)),
            Target::All => Ok((self.slot, Kind::All)),
            Target::Current => Ok((ORIGIN_NONE, Kind::Current)),
            Target::Unique(h) if h.is_empty() || h.len() > MAX_UNIQUE_HASH_LEN => {
                Err(PublishError::InvalidUniqueHash { len: h.len(), max: MAX_UNIQUE_HASH_LEN })
            }
            Target::Unique(_) if self.opts.testing => Ok((ORIGIN_NONE, Kind::Unique)),
            Target::Unique(_) => Ok((self.slot, Kind::Unique)),
        }
    }

    fn send(&mut self, buf: AlignedVec, target: Target<'_>) -> Result<(), PublishError> {
        if self.opts.testing {
            // Synchronous, in-process, wid None.
            if let Ok(d) = message::decode(&buf, self.geo.workers, self.geo.agent, self.opts.max_payload_len) {
                run_callbacks(&mut self.subs, &mut self.stats, &d.event);
            }
            self.pool.push(buf);
            self.stats.published += 1;
            return Ok(());
        }
        let cap = self.opts.max_queue_len;
        if let Target::Unique(hash) = target {
            if self.unique_out.len() >= cap {
                self.stats.overflows += 1;
                self.pool.push(buf);
                return Err(PublishError::QueueOverflow);
            }
            self.next_unique_id += 1;
            self.unique_out.push_back(UniqueOut { id: self.next_unique_id, hash: hash.into(), msg: buf });
            self.stats.published += 1;
            self.pump_unique();
            return Ok(());
        }
        let all = target == Target::All;
        let socket = self.mode() == Mode::Socket;
        let no_room = if !all {
            false
        } else if socket {
            // The broker never refuses its own events: a full destination drops and owes a notice.
            self.ctl.as_ref().is_some_and(|c| !c.is_broker() && !c.client_has_room())
        } else {
            self.port.is_none() && self.pre_attach.len() >= cap
        };
        if self.local.len() >= cap || no_room {
            self.stats.overflows += 1;
            self.pool.push(buf);
            return Err(PublishError::QueueOverflow);
        }
        if all {
            match (self.port.as_mut(), self.ctl.as_mut()) {
                (Some(port), _) => {
                    port.flush();
                    port.send_all(&buf);
                }
                (None, Some(ctl)) if socket => {
                    let stamp = stamp(self.incarnation, &mut self.out_seq);
                    if ctl.is_broker() {
                        self.stats.lost_outbound += ctl.broadcast(self.slot, &stamp, &buf);
                    } else {
                        ctl.queue_event(&stamp, &buf);
                    }
                    if ctl.flush_due() {
                        ctl.flush_data();
                    }
                }
                _ => self.pre_attach.push_back(buf.clone()),
            }
        }
        self.local.push_back(buf);
        self.stats.published += 1;
        Ok(())
    }

    /// Run the callbacks of every event that has arrived; never blocks. Returns the number
    /// of events dispatched (lost notices included).
    ///
    /// # Errors
    /// An attach refused by the broker (reported once), or a failure to set up the broker
    /// role. Callback panics are not errors: they are caught, logged and counted.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert_eq!(w.dispatch().unwrap(), 0);
    /// ```
    pub fn dispatch(&mut self) -> Result<usize> {
        if self.opts.testing {
            return Ok(0);
        }
        let mut total = 0;
        let mut rounds = 0;
        loop {
            rounds += 1;
            let (n, more) = self.pass()?;
            total += n;
            if n > 0 || more || self.busy_poll || rounds > 4 {
                break;
            }
            // Idle: arm so that the fd turns readable (and `wait` can sleep) when work comes.
            let armed = self.port.as_mut().is_none_or(|port| port.arm());
            if armed {
                break;
            }
        }
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        Ok(total)
    }

    /// One dispatch pass: control, backlogs, local queue, rings.
    fn pass(&mut self) -> Result<(usize, bool)> {
        if let Some(port) = self.port.as_mut() {
            if port.disarm() {
                self.stats.wakeups_received += 1;
            }
        }
        if self.ctl.is_some() {
            // Without rings (socket transport, or not attached yet) the sockets are the data path:
            // read them on every pass.
            let mut due =
                self.port.is_none() || !self.tokens.is_empty() || self.ctl.as_ref().is_some_and(|c| c.has_output());
            due |= self.ctl.as_ref().is_some_and(|c| c.retry_due());
            if let Some(port) = &self.port {
                let flag = &port.region().slot(self.slot).ctl_pending;
                if flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::Acquire) != 0 {
                    due = true;
                }
            }
            self.countdown = self.countdown.saturating_sub(1);
            if !due && self.countdown == 0 {
                self.countdown = CONTROL_EVERY;
                let now = Instant::now();
                if now.duration_since(self.last_control) >= CONTROL_INTERVAL {
                    self.last_control = now;
                    let mut tokens = std::mem::take(&mut self.tokens);
                    self.epoll.wait(&mut tokens, 0).map_err(|e| Error::io("epoll_wait", e))?;
                    tokens.retain(|t| *t != TOKEN_EVENTFD);
                    due = !tokens.is_empty();
                    self.tokens = tokens;
                }
            }
            if due {
                self.poll_control()?;
            }
        }
        let mut n = self.dispatch_socket();
        // Local events first: they are this worker's own stream, in publish order.
        for _ in 0..self.local.len() {
            let Some(buf) = self.local.pop_front() else { break };
            if let Ok(d) = message::decode(&buf, self.geo.workers, self.geo.agent, self.opts.max_payload_len) {
                run_callbacks(&mut self.subs, &mut self.stats, &d.event);
                n += 1;
            }
            let mut buf = buf;
            buf.clear();
            if self.pool.len() < 64 {
                self.pool.push(buf);
            }
        }
        let mut more = false;
        if let Some(port) = self.port.as_mut() {
            port.flush();
            let (workers, agent, max_payload) = (self.geo.workers, self.geo.agent, self.opts.max_payload_len);
            let subs = &mut self.subs;
            let stats = &mut self.stats;
            let geo = self.geo;
            let (m, more_rings) = port.drain(RING_BUDGET, &mut |inc| match inc {
                Incoming::Message { from, bytes } => match message::decode(bytes, workers, agent, max_payload) {
                    // "all" events come from their publisher's ring; unique events are relayed
                    // by the broker and carry their publisher's wid.
                    Ok(d)
                        if (d.kind == Kind::All && d.event.wid == Some(geo.wid_of(from)))
                            || (d.kind == Kind::Unique && d.event.wid.is_some()) =>
                    {
                        run_callbacks(subs, stats, &d.event);
                    }
                    _ => {
                        tracing::warn!(from, "dropping a malformed message");
                        stats.dropped += 1;
                    }
                },
                Incoming::Lost { from, count } => deliver_lost_notice(subs, stats, &geo, from, count),
            });
            n += m;
            more = more_rings;
        }
        // Busy with events: count them towards the next look at the control sockets, so a
        // lost broker is noticed within a few hundred events, not a few hundred passes.
        self.countdown = self.countdown.saturating_sub(n.min(u32::MAX as usize) as u32);
        Ok((n, more))
    }

    /// (socket transport) Dispatch the frames the control connections brought: as the broker,
    /// "all" events from workers (run here, then queued for every other slot); as a client,
    /// events and lost notices from the broker. Then write what is queued.
    fn dispatch_socket(&mut self) -> usize {
        let Some(ctl) = self.ctl.as_mut() else { return 0 };
        if ctl.mode() != Mode::Socket {
            return 0;
        }
        let mut inbox = ctl.take_inbox();
        let mut n = 0;
        let broker = ctl.is_broker();
        let (geo, me, max_payload) = (self.geo, self.slot, self.opts.max_payload_len);
        let (subs, stats, in_seq) = (&mut self.subs, &mut self.stats, &mut self.in_seq);
        inbox.drain(|from, k, body| {
            let (stamp, msg) = match body.split_first_chunk::<STAMP_LEN>() {
                Some((st, msg)) if k != kind::LOST => (*st, msg),
                _ => ([0; STAMP_LEN], body),
            };
            let decoded = message::decode(msg, geo.workers, geo.agent, max_payload);
            match k {
                kind::EVENT if broker => match decoded {
                    Ok(d) if d.kind == Kind::All && d.event.wid == Some(geo.wid_of(from)) => {
                        if !check_stamp(in_seq, subs, stats, &geo, from, &stamp) {
                            return;
                        }
                        run_callbacks(subs, stats, &d.event);
                        n += 1;
                        stats.lost_outbound += ctl.broadcast(from, &stamp, msg);
                    }
                    _ => {
                        tracing::warn!(from, "dropping a malformed event from a worker");
                        stats.dropped += 1;
                    }
                },
                kind::DELIVER if !broker => match decoded {
                    Ok(d)
                        if d.kind == Kind::All
                            && d.event.wid.is_some_and(|w| w != geo.wid_of(me))
                            && stamp != UNSEQ =>
                    {
                        let origin = d.event.wid.map_or(0, |w| geo.slot_of(w));
                        if check_stamp(in_seq, subs, stats, &geo, origin, &stamp) {
                            run_callbacks(subs, stats, &d.event);
                            n += 1;
                        }
                    }
                    Ok(d) if d.kind == Kind::Unique && d.event.wid.is_some() => {
                        run_callbacks(subs, stats, &d.event);
                        n += 1;
                    }
                    _ => {
                        tracing::warn!("dropping a malformed event from the broker");
                        stats.dropped += 1;
                    }
                },
                kind::LOST if !broker => {
                    let mut b = crate::wire::frame::Body(body);
                    match (b.u32(), b.u64()) {
                        (Ok(from), Ok(count)) if from < geo.slots && b.0.is_empty() => {
                            // Those sequence numbers will never come: not a gap to report again.
                            let e = &mut in_seq[from as usize];
                            if e.0 != 0 {
                                e.1 = e.1.saturating_add(count);
                            }
                            deliver_lost_notice(subs, stats, &geo, from, count);
                            n += 1;
                        }
                        _ => {
                            tracing::warn!("dropping a malformed lost notice from the broker");
                            stats.dropped += 1;
                        }
                    }
                }
                _ => stats.dropped += 1,
            }
        });
        ctl.return_inbox(inbox);
        ctl.flush_data();
        n
    }

    /// Write what is queued for other workers now. On shared memory, events that waited for
    /// room in a ring are retried; on the socket transport, the frames `publish` buffered
    /// (they are otherwise written by the next `dispatch`/`wait`, or once 64 KiB are queued).
    /// Returns true when nothing is left queued.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert!(w.flush());
    /// ```
    pub fn flush(&mut self) -> bool {
        let mut done = true;
        if let Some(port) = self.port.as_mut() {
            port.flush();
            done &= port.backlogged() == 0;
        }
        if let Some(ctl) = self.ctl.as_mut() {
            ctl.flush_data();
            done &= !ctl.has_output();
        }
        done
    }

    /// Block until an event arrives or `timeout` passes (`None`: no limit), then dispatch.
    /// Returns the number of events dispatched.
    ///
    /// # Errors
    /// As [`Worker::dispatch`], plus a failing `epoll_wait`.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert_eq!(w.wait(Some(Duration::from_millis(1))).unwrap(), 0);
    /// ```
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<usize> {
        if self.opts.testing {
            return Ok(0);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let n = self.dispatch()?;
            if n > 0 {
                return Ok(n);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(0);
            }
            if let Some(port) = self.port.as_mut() {
                if !port.arm() {
                    continue;
                }
            }
            let mut sleep = deadline.map(|d| d - now);
            if let Some(r) = self.ctl.as_ref().and_then(|c| c.retry_in(now)) {
                sleep = Some(sleep.map_or(r, |s| s.min(r)));
            }
            let ms = sleep.map_or(-1, |d| d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32);
            let mut tokens = std::mem::take(&mut self.tokens);
            self.epoll.wait(&mut tokens, ms).map_err(|e| Error::io("epoll_wait", e))?;
            tokens.retain(|t| *t != TOKEN_EVENTFD);
            self.tokens = tokens;
        }
    }

    /// Wait until attached to a broker, dispatching meanwhile; false on timeout.
    ///
    /// # Errors
    /// As [`Worker::wait`] (an attach refusal, for example).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert!(w.wait_ready(Duration::from_secs(1)).unwrap());
    /// ```
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        while !self.is_ready() {
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            self.wait(Some((deadline - now).min(Duration::from_millis(20))))?;
        }
        Ok(true)
    }

    fn poll_control(&mut self) -> Result<()> {
        self.fenced();
        let Some(ctl) = self.ctl.as_mut() else { return Ok(()) };
        let listener_ready = self.tokens.contains(&TOKEN_LISTENER);
        self.tokens.clear();
        let hand_out = match (&self.port, ctl.is_broker()) {
            (Some(port), true) => Some(HandOut {
                region_fd: port.region().fd().as_raw_fd(),
                eventfds: port.eventfds().iter().map(|e| e.as_fd().as_raw_fd()).collect(),
                epoch: self.epoch,
                region_id: port.region().id(),
                _life: std::marker::PhantomData,
            }),
            _ => None,
        };
        let events = ctl.poll(Instant::now(), &self.epoll, hand_out.as_ref(), listener_ready);
        drop(hand_out);
        let mut acks: Vec<(u32, u64)> = Vec::new();
        for ev in events {
            match ev {
                CtlEvent::Elected => self.become_broker()?,
                CtlEvent::Welcome { shm: None, broker_slot, epoch, broker_id } => {
                    self.epoch = epoch;
                    self.broker_slot = Some(broker_slot);
                    self.unique_sent = 0;
                    tracing::debug!(wid = %self.wid, broker_slot, epoch, "attached (socket transport)");
                    self.note_broker(broker_slot, epoch, broker_id);
                    if let Some(old) = self.port.take() {
                        // The deployment moved off shared memory (a broker that cannot create
                        // it took over): our rings are gone with the old region.
                        tracing::warn!("the new broker runs the socket transport; leaving the shared region");
                        self.epoll.delete(old.my_eventfd().as_fd());
                        fold_counters(&mut self.stats, &old);
                    }
                    let ctl = self.ctl.as_mut().expect("control events come from ctl");
                    for msg in self.pre_attach.drain(..) {
                        if !ctl.queue_event(&stamp(self.incarnation, &mut self.out_seq), &msg) {
                            self.stats.overflows += 1;
                        }
                    }
                }
                CtlEvent::Welcome {
                    shm: Some(ShmWelcome { region_fd, eventfds, region_id }),
                    broker_slot,
                    epoch,
                    ..
                } => {
                    self.note_broker(broker_slot, epoch, region_id);
                    self.epoch = epoch;
                    self.broker_slot = Some(broker_slot);
                    self.unique_sent = 0;
                    tracing::debug!(wid = %self.wid, broker_slot, epoch, "attached");
                    if self.port.as_ref().is_some_and(|p| p.region().id() == region_id) {
                        continue;
                    }
                    match Region::open(region_fd, self.geo) {
                        Ok(region) => {
                            let efds = eventfds.into_iter().map(EventFd::from_owned).collect();
                            self.install_port(region, efds)?;
                            // Events queued for a socket-transport broker that is gone.
                            let left = self.ctl.as_mut().map(|c| c.take_client_out()).unwrap_or_default();
                            if let Some(port) = self.port.as_mut() {
                                for m in left {
                                    let mut b = AlignedVec::with_capacity(m.len());
                                    b.extend_from_slice(m.get(STAMP_LEN..).unwrap_or_default());
                                    port.send_all(&b);
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "shared region from the broker rejected");
                            self.pending_error = Some(e);
                        }
                    }
                }
                CtlEvent::Rejected(reason) => {
                    tracing::error!(%reason, "attach refused by the broker");
                    self.pending_error = Some(Error::AttachRefused(reason));
                }
                CtlEvent::BrokerLost => {
                    self.stats.failovers += 1;
                    self.unique_sent = 0;
                    self.broker_slot = None;
                    tracing::warn!(wid = %self.wid, "lost the broker; re-electing");
                }
                CtlEvent::Unique { slot, id, hash, msg } => {
                    self.handle_unique(slot, &hash, &msg);
                    // One acknowledgement per publisher and poll: the highest id handled.
                    match acks.iter_mut().find(|(s, _)| *s == slot) {
                        Some(a) => a.1 = a.1.max(id),
                        None => acks.push((slot, id)),
                    }
                }
                CtlEvent::UniqueAck(id) => {
                    while self.unique_out.front().is_some_and(|u| u.id <= id) {
                        if let Some(u) = self.unique_out.pop_front() {
                            self.unique_sent = self.unique_sent.saturating_sub(1);
                            self.recycle(u.msg);
                        }
                    }
                }
            }
        }
        for (slot, id) in acks {
            if let Some(ctl) = self.ctl.as_mut() {
                ctl.ack_unique(slot, id);
            }
            if let Some(port) = &self.port {
                if slot < self.geo.slots {
                    // A busy-polling publisher looks at its control socket at once.
                    port.region().slot(slot).ctl_pending.store(1, Ordering::Release);
                }
            }
        }
        self.pump_unique();
        Ok(())
    }

    fn recycle(&mut self, mut buf: AlignedVec) {
        buf.clear();
        if self.pool.len() < 64 {
            self.pool.push(buf);
        }
    }

    /// Move unique events towards the broker: handle them here when we are the broker,
    /// send the ones not yet sent on this connection when attached, keep them otherwise.
    fn pump_unique(&mut self) {
        if self.unique_out.is_empty() || (self.port.is_none() && self.mode() != Mode::Socket) {
            return;
        }
        if self.is_broker() && !self.fenced() {
            if self.port.is_none() && self.heap_dedup.is_none() {
                return;
            }
            while let Some(u) = self.unique_out.pop_front() {
                self.handle_unique(self.slot, u.hash.as_bytes(), &u.msg);
                self.recycle(u.msg);
            }
            self.unique_sent = 0;
            return;
        }
        let (Some(ctl), Some(broker)) = (self.ctl.as_mut(), self.broker_slot) else { return };
        let mut sent_any = false;
        for u in self.unique_out.iter().skip(self.unique_sent) {
            if !ctl.send_unique(u.id, u.hash.as_bytes(), &u.msg) {
                break;
            }
            self.unique_sent += 1;
            sent_any = true;
        }
        if sent_any {
            if let Some(port) = &self.port {
                if broker < self.geo.slots {
                    // Tell a busy-polling broker to look at its control sockets now.
                    port.region().slot(broker).ctl_pending.store(1, Ordering::Release);
                }
            }
        }
    }

    /// (broker) Dedup a unique event and deliver it to one live worker.
    fn handle_unique(&mut self, from: u32, hash: &[u8], msg: &[u8]) {
        let ok = message::decode(msg, self.geo.workers, self.geo.agent, self.opts.max_payload_len)
            .is_ok_and(|d| d.kind == Kind::Unique && d.event.wid == Some(self.geo.wid_of(from)));
        if !ok {
            tracing::warn!(from, "dropping a malformed unique event");
            self.stats.dropped += 1;
            return;
        }
        let ttl = u64::try_from(self.opts.unique_timeout.as_nanos()).unwrap_or(u64::MAX);
        let now = crate::sys::monotonic_ns();
        let check = match (&self.port, &self.heap_dedup) {
            (Some(port), _) => {
                port.region().dedup().check_and_record(crate::dedup::tag(port.region().sip_key(), hash), now, ttl)
            }
            (None, Some(heap)) => heap.table().check_and_record(crate::dedup::tag(heap.key(), hash), now, ttl),
            (None, None) => return,
        };
        match check {
            Check::Duplicate => {
                self.stats.unique_duplicates += 1;
                return;
            }
            Check::Full => {
                self.stats.unique_unrecorded += 1;
                tracing::warn!(hash = %String::from_utf8_lossy(hash), "unique table window full; delivering unrecorded");
            }
            Check::New => {}
        }
        let target = self.pick_unique_target();
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(msg);
        if target == self.slot {
            self.local.push_back(buf);
        } else {
            if let Some(port) = self.port.as_mut() {
                port.send_to(target, &buf);
            } else if let Some(ctl) = self.ctl.as_mut() {
                if !ctl.deliver_to(target, from, &buf) {
                    self.stats.lost_outbound += 1;
                }
            }
            self.recycle(buf);
        }
    }

    /// (broker) Next live slot other than ours, round-robin; ourselves when nobody else is
    /// alive. (An event handed to another worker is in its ring at once; one kept for our
    /// own callbacks would die with us if we were killed before dispatching it, after its
    /// hash was recorded and acknowledged.)
    fn pick_unique_target(&mut self) -> u32 {
        let slots = self.geo.slots;
        let Some(ctl) = self.ctl.as_ref() else { return self.slot };
        for i in 0..slots {
            let s = (self.unique_rr + i) % slots;
            if s != self.slot && ctl.slot_alive(s) {
                self.unique_rr = (s + 1) % slots;
                return s;
            }
        }
        self.slot
    }

    fn install_port(&mut self, region: Region, eventfds: Vec<EventFd>) -> Result<()> {
        if let Some(old) = self.port.take() {
            self.epoll.delete(old.my_eventfd().as_fd());
            fold_counters(&mut self.stats, &old);
        }
        let max_msg = message::max_message_len(self.opts.max_payload_len);
        let mut port = ShmPort::attach(region, eventfds, self.slot, self.opts.max_queue_len, max_msg);
        self.epoll.add(port.my_eventfd().as_fd(), TOKEN_EVENTFD).map_err(|e| Error::io("epoll_ctl", e))?;
        for msg in self.pre_attach.drain(..) {
            port.send_all(&msg);
        }
        self.port = Some(port);
        if let Some(ctl) = self.ctl.as_mut() {
            ctl.hold_region();
        }
        Ok(())
    }

    /// Decide the data path of a new broker: the shared region it already has; the socket
    /// transport when it already ran it (a deployment does not switch while it lives), when
    /// the options force it, or when `Auto` cannot create the region.
    fn choose_broker_mode(&mut self) -> Result<Mode> {
        if self.port.is_some() {
            return Ok(Mode::Shm);
        }
        let sticky = self.mode() == Mode::Socket;
        if sticky || self.opts.transport == Transport::Socket {
            return Ok(Mode::Socket);
        }
        let created = Region::create(self.geo, self.opts.max_payload_len).and_then(|region| {
            let eventfds = (0..self.geo.slots)
                .map(|_| EventFd::new())
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| Error::io("creating eventfds", e))?;
            Ok((region, eventfds))
        });
        match created {
            Ok((region, eventfds)) => {
                self.install_port(region, eventfds)?;
                Ok(Mode::Shm)
            }
            Err(e) if self.opts.transport == Transport::Auto => {
                tracing::warn!(error = %e, "shared memory unavailable; falling back to the socket transport");
                Ok(Mode::Socket)
            }
            Err(e) => Err(e),
        }
    }

    fn become_broker(&mut self) -> Result<()> {
        if self.choose_broker_mode()? == Mode::Socket {
            return self.become_socket_broker();
        }
        let port = self.port.as_ref().expect("port installed above");
        let h = port.region().header();
        self.epoch = h.broker_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        h.broker_slot.store(self.slot, Ordering::Relaxed);
        h.broker_pid.store(std::process::id(), Ordering::Release);
        self.ctl.as_mut().expect("only live workers are elected").serve(&self.epoll, Mode::Shm, self.epoch)?;
        self.broker_slot = Some(self.slot);
        self.note_elected();
        self.pump_unique();
        Ok(())
    }

    /// Serve the socket transport: the dedup table in private memory, and the events that
    /// waited for a broker (published before any attach, or not yet sent to a broker that
    /// died) go out to every slot as ours.
    fn become_socket_broker(&mut self) -> Result<()> {
        self.epoch += 1;
        let ctl = self.ctl.as_mut().expect("only live workers are elected");
        ctl.serve(&self.epoll, Mode::Socket, self.epoch)?;
        self.broker_slot = Some(self.slot);
        if self.heap_dedup.is_none() {
            self.heap_dedup = Some(HeapTable::new(self.opts.unique_capacity));
        }
        // Queued as a client: stamped already, the sequence continues.
        for m in ctl.take_client_out() {
            if let Some((st, msg)) = m.split_first_chunk::<STAMP_LEN>() {
                self.stats.lost_outbound += ctl.broadcast(self.slot, st, msg);
            }
        }
        for m in self.pre_attach.drain(..) {
            let st = stamp(self.incarnation, &mut self.out_seq);
            self.stats.lost_outbound += ctl.broadcast(self.slot, &st, &m);
        }
        let id = ctl.broker_id();
        self.note_broker(self.slot, self.epoch, id);
        self.pump_unique();
        Ok(())
    }

    /// The data path in use (Unknown before the first attach or election).
    fn mode(&self) -> Mode {
        match (&self.port, &self.ctl) {
            (Some(_), _) => Mode::Shm,
            (None, Some(c)) => c.mode(),
            (None, None) => Mode::Unknown,
        }
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
            Some(c) => (self.port.is_some() || c.mode() == Mode::Socket) && (c.is_broker() || c.is_attached_client()),
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
        match self.mode() {
            Mode::Shm => Transport::SharedMemory,
            Mode::Socket => Transport::Socket,
            Mode::Unknown => Transport::Auto,
        }
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
        self.busy_poll = on;
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
        s.unique_pending = self.unique_out.len() as u64;
        if let Some(port) = &self.port {
            fold_counters(&mut s, port);
            s.peers = port
                .depths()
                .map(|(slot, out, backlog, inb)| PeerStats {
                    wid: self.geo.wid_of(slot),
                    outbound_depth: out,
                    backlog,
                    inbound_depth: inb,
                })
                .collect();
        } else if let Some(ctl) = &self.ctl {
            s.peers = ctl
                .queue_depths()
                .into_iter()
                .map(|(slot, depth)| PeerStats {
                    wid: self.geo.wid_of(if slot == u32::MAX { self.broker_slot.unwrap_or(0) } else { slot }),
                    outbound_depth: depth,
                    backlog: 0,
                    inbound_depth: 0,
                })
                .collect();
        }
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

/// Run the callbacks for one delivered event and count it.
fn run_callbacks(subs: &mut Subscriptions, stats: &mut Stats, ev: &Event<'_>) {
    let r = subs.run(ev);
    stats.delivered += 1;
    stats.callbacks_run += r.called;
    stats.callback_panics += r.panicked;
}

/// The stamp of our next "all" event on the socket transport.
fn stamp(incarnation: u64, seq: &mut u64) -> Stamp {
    let mut st = [0u8; STAMP_LEN];
    st[..8].copy_from_slice(&incarnation.to_le_bytes());
    st[8..].copy_from_slice(&seq.to_le_bytes());
    *seq += 1;
    st
}

/// No stamp: a unique delivery.
const UNSEQ: Stamp = crate::control::UNSEQUENCED;

/// Check an "all" event's stamp against what we saw of publisher slot `from`: false for a
/// sequence number already seen (dropped, counted); a gap (events that died with a broker)
/// is reported as a lost notice before the event runs. A new incarnation (the publisher
/// restarted) starts a new sequence.
fn check_stamp(
    in_seq: &mut [(u64, u64)],
    subs: &mut Subscriptions,
    stats: &mut Stats,
    geo: &Geometry,
    from: u32,
    st: &Stamp,
) -> bool {
    let inc = u64::from_le_bytes(st[..8].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(st[8..].try_into().expect("8 bytes"));
    let Some(e) = in_seq.get_mut(from as usize) else { return false };
    if inc == 0 {
        stats.dropped += 1;
        return false;
    }
    if e.0 != inc {
        *e = (inc, seq.saturating_add(1));
        return true;
    }
    if seq < e.1 {
        tracing::debug!(from, seq, "dropping an event seen already");
        stats.dropped += 1;
        return false;
    }
    let gap = seq - e.1;
    e.1 = seq.saturating_add(1);
    if gap > 0 {
        deliver_lost_notice(subs, stats, geo, from, gap);
    }
    true
}

/// Run the callbacks of a "lost" system notice: `count` events of publisher slot `from`
/// never reached this worker.
fn deliver_lost_notice(subs: &mut Subscriptions, stats: &mut Stats, geo: &Geometry, from: u32, count: u64) {
    stats.lost += count;
    let publisher = geo.wid_of(from);
    tracing::warn!(%publisher, count, "events lost on the way to this worker");
    let mut b = AlignedVec::new();
    let lost = Lost { count, publisher };
    if message::encode_typed(&mut b, SYSTEM_SOURCE, "lost", &lost, from, Kind::System, usize::MAX).is_ok() {
        if let Ok(d) = message::decode(&b, geo.workers, geo.agent, usize::MAX) {
            run_callbacks(subs, stats, &d.event);
        }
    }
}

/// Add a port's transport counters to the worker's own.
fn fold_counters(s: &mut Stats, port: &ShmPort) {
    let c = port.counters;
    s.wakeups_sent += c.wakeups_sent;
    s.lost_outbound += c.lost_outbound;
    s.dropped += c.dropped;
}
