//! Publishing from a callback: the [`Context`] a callback registered with
//! [`Worker::subscribe_with`](crate::worker::Worker::subscribe_with) receives. While callbacks run
//! the worker is busy delivering (its data path is borrowed), so a publish made here is
//! checked at once, with the errors [`Worker::publish`](crate::worker::Worker::publish) would give
//! at that moment, encoded, and queued; the worker sends the queue, in call order, as soon
//! as the delivery pass that ran the callback returns.
//!
//! The checks run against a snapshot of the worker's bounds taken before the pass ([`Limits`]),
//! reduced by every publish already queued here, so a publish accepted here is never refused
//! when it is sent.

use rkyv::ser::allocator::Arena;
use rkyv::util::AlignedVec;

use crate::error::PublishError;
use crate::event::{MAX_UNIQUE_HASH_LEN, Payload, Target, Wid};
use crate::message::{self, Kind, ORIGIN_NONE};

/// Room left in a bounded queue, as frames and bytes (a push needs one frame and at least
/// one byte left; it then uses `overhead` plus the message's length in bytes, possibly
/// crossing the byte bound, as an `OutQueue` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Room {
    pub(crate) frames: usize,
    pub(crate) bytes: usize,
    pub(crate) overhead: usize,
}

impl Room {
    /// No bound.
    pub(crate) const UNLIMITED: Room = Room { frames: usize::MAX, bytes: usize::MAX, overhead: 0 };

    /// At most `frames` more messages, whatever their size.
    pub(crate) fn frames(frames: usize) -> Room {
        Room { frames, bytes: usize::MAX, overhead: 0 }
    }

    fn fits(&self) -> bool {
        self.frames > 0 && self.bytes > 0
    }

    fn take(&mut self, len: usize) {
        self.frames -= 1;
        self.bytes = self.bytes.saturating_sub(self.overhead.saturating_add(len));
    }
}

/// The worker's bounds when a delivery pass starts, as `publish` would check them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Testing mode: events run in-process, nothing is bounded but this queue.
    pub(crate) in_process: bool,
    /// The origin of `All` and `Unique` messages (our slot, or none in testing mode).
    pub(crate) origin: u32,
    pub(crate) max_payload_len: usize,
    /// `max_queue_len`.
    pub(crate) cap: usize,
    /// Our own queue's use (queued self-copies and `Current` events, counted ones).
    pub(crate) local_used: usize,
    /// The data path's room for `All` events.
    pub(crate) all: Room,
    /// Room for unique events (the outbox, or unbounded when routed at once).
    pub(crate) unique: Room,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            in_process: true,
            origin: ORIGIN_NONE,
            max_payload_len: 0,
            cap: 0,
            local_used: 0,
            all: Room::frames(0),
            unique: Room::frames(0),
        }
    }
}

/// One publish queued by a callback.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) kind: Kind,
    pub(crate) msg: AlignedVec,
    /// The unique hash (empty otherwise), source and event names, in [`Context::names`].
    pub(crate) hash: (usize, usize),
    pub(crate) source: (usize, usize),
    pub(crate) event: (usize, usize),
}

/// Handed to a callback registered with
/// [`Worker::subscribe_with`](crate::worker::Worker::subscribe_with): publish from inside the
/// callback.
///
/// A publish here is checked at the call, with the errors
/// [`Worker::publish`](crate::worker::Worker::publish) would return at that moment
/// ([`PublishError::PayloadTooLarge`], [`PublishError::QueueOverflow`] when this worker's
/// own queue, or the data path's, would be full counting the publishes already made from
/// callbacks, [`PublishError::InvalidUniqueHash`]): an `Ok` publish is sent, an `Err` one
/// is not. Accepted publishes are sent in call order right after the delivery pass that
/// ran the callback (before `dispatch` returns), so, like every other publish of this
/// worker, they reach each receiver after everything this worker published before and
/// before anything it publishes afterwards. This worker's own callbacks see them (a
/// `Target::Current` or `Target::All` event) at the next pass, never within the callback
/// run that published them: a callback that publishes to itself runs once per pass, it
/// does not recurse.
///
/// In testing mode (`Options::testing`) the queue is sent (its callbacks run) when the
/// outer `publish` or `dispatch` call's callbacks have returned; what those callbacks
/// publish in turn waits for the next `publish` or `dispatch` call. There the queue is
/// bounded by `max_queue_len` alone.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use std::sync::{Arc, Mutex};
/// use worker_events::{Events, Options, Target, Wid};
///
/// let dir = std::env::temp_dir().join(format!("we-doc-ctx-{}", std::process::id()));
/// let events = Events::new(Options::new(dir.join("ev.sock")).workers(1)).unwrap();
/// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
/// // Answer every "ping" with a "pong" to all workers.
/// w.subscribe_with("game", "ping", |cx, ev| {
///     cx.publish_bytes(Target::All, "game", "pong", ev.data_bytes()).unwrap();
/// });
/// let pongs = Arc::new(Mutex::new(Vec::new()));
/// let p = pongs.clone();
/// w.subscribe("game", "pong", move |ev| p.lock().unwrap().push(ev.data_bytes().to_vec()));
/// w.publish_bytes(Target::All, "game", "ping", b"1").unwrap();
/// while w.dispatch().unwrap() > 0 {} // the ping, then (a pass later) our copy of the pong
/// assert_eq!(*pongs.lock().unwrap(), [b"1".to_vec()]);
/// assert_eq!(w.stats().published, 2);
/// # drop(w); let _ = std::fs::remove_dir_all(dir);
/// ```
#[derive(Default)]
pub struct Context {
    wid: Option<Wid>,
    limits: Limits,
    /// Publishes accepted since the last send, in call order.
    pub(crate) queue: Vec<Queued>,
    /// Their names, back to back.
    pub(crate) names: String,
    /// `All` and `Current` publishes queued (each takes a place in our own queue).
    local_queued: usize,
    arena: Arena,
    /// Spare message buffers.
    pub(crate) spare: Vec<AlignedVec>,
    /// Publishes refused with [`PublishError::QueueOverflow`] (part of `Stats::overflows`).
    pub(crate) overflows: u64,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("wid", &self.wid).field("queued", &self.queue.len()).finish_non_exhaustive()
    }
}

impl Context {
    /// A context for worker `wid`.
    pub(crate) fn new(wid: Wid) -> Context {
        Context { wid: Some(wid), ..Context::default() }
    }

    /// The worker whose callback this is.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.subscribe_with("a", "b", |cx, _| assert_eq!(cx.wid(), Wid::Worker(0)));
    /// w.publish_bytes(Target::Current, "a", "b", b"").unwrap();
    /// ```
    pub fn wid(&self) -> Wid {
        self.wid.unwrap_or(Wid::Worker(0))
    }

    /// Publishes accepted and not sent yet.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.subscribe_with("a", "b", |cx, _| {
    ///     cx.publish_bytes(Target::Current, "a", "c", b"").unwrap();
    ///     assert_eq!(cx.queued(), 1);
    /// });
    /// w.publish_bytes(Target::Current, "a", "b", b"").unwrap();
    /// ```
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// A new delivery pass: the worker's bounds as they are now (nothing is queued).
    pub(crate) fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.local_queued = 0;
    }

    /// Our own queue's use changed during the pass (an event of it was taken to run).
    pub(crate) fn set_local_used(&mut self, used: usize) {
        self.limits.local_used = used;
    }

    /// Publish a typed value from a callback (serialized now, sent after the pass).
    ///
    /// # Errors
    /// As [`Worker::publish`](crate::worker::Worker::publish), decided at this call.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.subscribe_with("cfg", "reload", |cx, _| cx.publish(Target::All, "cfg", "version", &7u32).unwrap());
    /// ```
    pub fn publish<T: Payload>(
        &mut self,
        target: Target<'_>,
        source: &str,
        event: &str,
        data: &T,
    ) -> Result<(), PublishError> {
        let (origin, kind) = self.check(target)?;
        let mut buf = self.spare.pop().unwrap_or_default();
        let max = self.limits.max_payload_len;
        if let Err(e) = message::encode_typed_in(&mut buf, &mut self.arena, source, event, data, origin, kind, max) {
            self.spare.push(buf);
            return Err(e);
        }
        self.accept(buf, kind, target, source, event)
    }

    /// Publish raw bytes from a callback (sent after the pass).
    ///
    /// # Errors
    /// As [`Worker::publish_bytes`](crate::worker::Worker::publish_bytes), decided at this call.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid, PublishError};
    /// let events = Events::new(Options::new("/tmp/unused.sock").testing(true).max_payload_len(4)).unwrap();
    /// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.subscribe_with("a", "b", |cx, _| {
    ///     let err = cx.publish_bytes(Target::All, "a", "c", b"12345").unwrap_err();
    ///     assert_eq!(err, PublishError::PayloadTooLarge { limit: 4 });
    /// });
    /// w.publish_bytes(Target::Current, "a", "b", b"").unwrap();
    /// ```
    pub fn publish_bytes(
        &mut self,
        target: Target<'_>,
        source: &str,
        event: &str,
        data: &[u8],
    ) -> Result<(), PublishError> {
        let (origin, kind) = self.check(target)?;
        let mut buf = self.spare.pop().unwrap_or_default();
        let max = self.limits.max_payload_len;
        if let Err(e) = message::encode_bytes(&mut buf, source, event, data, origin, kind, max) {
            self.spare.push(buf);
            return Err(e);
        }
        self.accept(buf, kind, target, source, event)
    }

    /// The target's origin and kind, or the error `publish` would give before encoding.
    fn check(&self, target: Target<'_>) -> Result<(u32, Kind), PublishError> {
        let origin = self.limits.origin;
        match target {
            Target::All => Ok((origin, Kind::All)),
            Target::Current => Ok((ORIGIN_NONE, Kind::Current)),
            Target::Unique(h) if h.is_empty() || h.len() > MAX_UNIQUE_HASH_LEN => {
                Err(PublishError::InvalidUniqueHash { len: h.len(), max: MAX_UNIQUE_HASH_LEN })
            }
            Target::Unique(_) => Ok((origin, Kind::Unique)),
        }
    }

    /// The room checks `publish` makes after encoding; queue the message if they pass.
    fn accept(
        &mut self,
        msg: AlignedVec,
        kind: Kind,
        target: Target<'_>,
        source: &str,
        event: &str,
    ) -> Result<(), PublishError> {
        let l = &mut self.limits;
        let fits = if l.in_process {
            self.queue.len() < l.cap
        } else {
            match kind {
                Kind::Unique => l.unique.fits(),
                Kind::All => l.local_used + self.local_queued < l.cap && l.all.fits(),
                _ => l.local_used + self.local_queued < l.cap,
            }
        };
        if !fits {
            self.overflows += 1;
            self.spare.push(msg);
            return Err(PublishError::QueueOverflow);
        }
        match kind {
            Kind::Unique => l.unique.take(msg.len()),
            Kind::All => {
                l.all.take(msg.len());
                self.local_queued += 1;
            }
            _ => self.local_queued += 1,
        }
        let hash = if let Target::Unique(h) = target { h } else { "" };
        let mut push = |s: &str| {
            let start = self.names.len();
            self.names.push_str(s);
            (start, self.names.len())
        };
        let (hash, source, event) = (push(hash), push(source), push(event));
        self.queue.push(Queued { kind, msg, hash, source, event });
        Ok(())
    }
}
