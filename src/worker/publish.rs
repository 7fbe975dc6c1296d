//! Publishing: encode once, route by target, hand "all" events to the data path and to our
//! own callbacks' queue, unique events to the outbox (`unique.rs`).

use rkyv::util::AlignedVec;

use super::Worker;
use super::delivery::run_callbacks;
use crate::dedup::Tag;
use crate::error::PublishError;
use crate::event::{Lost, MAX_UNIQUE_HASH_LEN, Payload, SYSTEM_SOURCE, Target};
use crate::message::{self, Ext, Kind, MAX_ORIGIN_HOST_LEN, ORIGIN_NONE};
use crate::wire::Connections;

impl Worker {
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
        if self.forked() {
            return Err(PublishError::Forked);
        }
        let (origin, kind) = self.route(target)?;
        let tag = self.prefetch_unique(target);
        let mut buf = self.buffer();
        let max = self.opts.max_payload_len;
        if let Err(e) = message::encode_typed_in(&mut buf, &mut self.arena, source, event, data, origin, kind, max) {
            self.recycle(buf);
            return Err(e);
        }
        self.send_and_queued(buf, target, tag, source, event)
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
        self.publish_bytes_with(target, source, event, data, Ext::None)
    }

    /// [`Worker::publish_bytes`] with a message extension (none, or the origin host).
    fn publish_bytes_with(
        &mut self,
        target: Target<'_>,
        source: &str,
        event: &str,
        data: &[u8],
        ext: Ext<'_>,
    ) -> Result<(), PublishError> {
        if self.forked() {
            return Err(PublishError::Forked);
        }
        let (origin, kind) = self.route(target)?;
        let tag = self.prefetch_unique(target);
        let mut buf = self.buffer();
        if let Err(e) = message::encode_bytes(&mut buf, source, event, data, origin, kind, self.opts.max_payload_len) {
            self.recycle(buf);
            return Err(e);
        }
        if ext != Ext::None {
            message::set_ext(&mut buf, ext);
        }
        self.send_and_queued(buf, target, tag, source, event)
    }

    /// [`Worker::publish_bytes`] for an event a bridge relays from another host: the same
    /// routing for every [`Target`], on both transports, and the message carries
    /// `origin_host`, which receivers read with
    /// [`Event::origin_host`](crate::event::Event::origin_host) (`None` for every event published on
    /// this host). A relayed unique event is never diverted to the agent (see
    /// [`Worker::divert_unique`]): it goes through this host's dedup table as usual.
    ///
    /// # Errors
    /// As [`Worker::publish`], and [`PublishError::InvalidOriginHost`] when `origin_host` is
    /// empty or longer than 255 bytes.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid, PublishError};
    /// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.subscribe("cache", "purge", |ev| assert_eq!(ev.origin_host(), Some("host-a")));
    /// w.publish_relayed("host-a", Target::All, "cache", "purge", b"k1").unwrap();
    /// let err = w.publish_relayed("", Target::All, "cache", "purge", b"k1").unwrap_err();
    /// assert_eq!(err, PublishError::InvalidOriginHost { len: 0, max: 255 });
    /// ```
    pub fn publish_relayed(
        &mut self,
        origin_host: &str,
        target: Target<'_>,
        source: &str,
        event: &str,
        data: &[u8],
    ) -> Result<(), PublishError> {
        if self.forked() {
            return Err(PublishError::Forked);
        }
        check_origin_host(origin_host)?;
        self.publish_bytes_with(target, source, event, data, Ext::OriginHost(origin_host))
    }

    /// Deliver the library's `("worker-events", "lost")` notice, stamped with
    /// `origin_host`, to every worker of this host and the privileged agent (this process
    /// included, as a [`Target::All`] event): `count` events published on `origin_host` could
    /// not be relayed here. Receivers see it as they see a local loss: [`Event::lost`] gives
    /// `Lost { count, publisher }` with `publisher` this worker's id, it adds `count` to their
    /// `Stats::lost`, and [`Event::origin_host`] is `Some(origin_host)`. So a worker that
    /// counts "events received + lost counts" covers the events lost between hosts too. A
    /// `count` of 0 sends nothing.
    ///
    /// [`Event::lost`]: crate::event::Event::lost
    /// [`Event::origin_host`]: crate::event::Event::origin_host
    ///
    /// # Errors
    /// [`PublishError::InvalidOriginHost`] as [`Worker::publish_relayed`];
    /// [`PublishError::QueueOverflow`] as [`Worker::publish`] (nothing was delivered; retry).
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.subscribe("worker-events", "lost", |ev| {
    ///     assert_eq!(ev.lost().unwrap().count, 7);
    ///     assert_eq!(ev.origin_host(), Some("host-a"));
    /// });
    /// w.report_relayed_lost("host-a", 7).unwrap();
    /// assert_eq!(w.stats().lost, 7);
    /// ```
    pub fn report_relayed_lost(&mut self, origin_host: &str, count: u64) -> Result<(), PublishError> {
        if self.forked() {
            return Err(PublishError::Forked);
        }
        check_origin_host(origin_host)?;
        if count == 0 {
            return Ok(());
        }
        let (origin, _) = self.route(Target::All)?;
        let lost = Lost { count, publisher: self.wid };
        let mut buf = self.buffer();
        let max = self.opts.max_payload_len;
        if let Err(e) = message::encode_typed(&mut buf, SYSTEM_SOURCE, "lost", &lost, origin, Kind::All, max) {
            self.recycle(buf);
            return Err(e);
        }
        message::set_ext(&mut buf, Ext::OriginHost(origin_host));
        self.send_and_queued(buf, Target::All, None, SYSTEM_SOURCE, "lost")
    }

    /// [`Worker::send`]; in testing mode, where it ran our callbacks, then what they published.
    fn send_and_queued(
        &mut self,
        buf: AlignedVec,
        target: Target<'_>,
        tag: Option<Tag>,
        source: &str,
        event: &str,
    ) -> Result<(), PublishError> {
        self.send(buf, target, tag, source, event)?;
        if self.path.is_in_process() {
            self.send_queued();
        }
        Ok(())
    }

    /// The origin and kind a target's message carries (in testing mode no origin: events
    /// run in-process with wid `None`).
    fn route(&self, target: Target<'_>) -> Result<(u32, Kind), PublishError> {
        let origin = if self.path.is_in_process() { ORIGIN_NONE } else { self.slot };
        match target {
            Target::All => Ok((origin, Kind::All)),
            Target::Current => Ok((ORIGIN_NONE, Kind::Current)),
            Target::Unique(h) if h.is_empty() || h.len() > MAX_UNIQUE_HASH_LEN => {
                Err(PublishError::InvalidUniqueHash { len: h.len(), max: MAX_UNIQUE_HASH_LEN })
            }
            Target::Unique(_) => Ok((origin, Kind::Unique)),
        }
    }

    /// Send an encoded message (after [`Worker::route`]); the room checks are made here.
    /// `tag`: a unique event's dedup tag from [`Worker::prefetch_unique`], if taken.
    pub(super) fn send(
        &mut self,
        buf: AlignedVec,
        target: Target<'_>,
        tag: Option<Tag>,
        source: &str,
        event: &str,
    ) -> Result<(), PublishError> {
        if self.path.is_in_process() {
            // Synchronous, in-process, wid None.
            let (g, max) = (self.geo, self.opts.max_payload_len);
            if let Ok(d) = message::decode(&buf, g.workers, g.agent, max) {
                self.prepare_callbacks();
                run_callbacks(&mut self.subs, &mut self.stats, &mut self.cx, &d.event);
            }
            self.recycle(buf);
            self.stats.published += 1;
            return Ok(());
        }
        if let Target::Unique(hash) = target {
            return self.queue_unique(hash, tag, buf);
        }
        let cap = self.opts.max_queue_len;
        let all = target == Target::All;
        if self.local.len() + self.unrun_self >= cap || (all && !self.path.has_room(cap)) {
            self.stats.overflows += 1;
            self.recycle(buf);
            return Err(PublishError::QueueOverflow);
        }
        if all {
            let conns = self.ctl.as_mut().map(|c| c as &mut dyn Connections);
            self.path.send_all(&buf, conns);
        }
        if all && !self.subs.wants_joined(message::joined_names(&buf), source, event) {
            // Our own copy would run no callback: count it for the next dispatch (which
            // reports it as delivered, as before) instead of queueing and decoding it. A
            // callback subscribed after this publish does not see it.
            self.unrun_self += 1;
            self.recycle(buf);
        } else {
            self.local.push_back(buf);
        }
        self.stats.published += 1;
        Ok(())
    }
}

/// An origin host must be 1..=255 bytes.
fn check_origin_host(host: &str) -> Result<(), PublishError> {
    if host.is_empty() || host.len() > MAX_ORIGIN_HOST_LEN {
        return Err(PublishError::InvalidOriginHost { len: host.len(), max: MAX_ORIGIN_HOST_LEN });
    }
    Ok(())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use crate::error::PublishError;
    use crate::event::{Target, Wid};
    use crate::options::{Options, Transport};
    use crate::worker::Events;

    /// The publisher's own copy of an `All` event is decided at publish: unwanted copies are
    /// counted (delivered, dispatch's return, the own-queue bound) but never run, and a
    /// subscription made after the publish does not see the event.
    #[test]
    fn own_all_copy_is_decided_at_publish() {
        let d = std::env::temp_dir().join(format!("we-self-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let opts = Options::new(d.join("ev.sock")).workers(1).transport(Transport::SharedMemory).max_queue_len(4);
        let mut w = Events::new(opts).unwrap().init_worker(Wid::Worker(0)).unwrap();
        assert!(w.wait_ready(Duration::from_secs(5)).unwrap());
        w.publish_bytes(Target::All, "s", "e", b"0").unwrap(); // nobody wants it
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        w.subscribe("s", "e", move |ev| s.lock().unwrap().push(ev.data_bytes().to_vec()));
        w.publish_bytes(Target::Current, "s", "e", b"1").unwrap();
        w.publish_bytes(Target::All, "s", "e", b"2").unwrap();
        w.publish_bytes(Target::All, "s", "other", b"3").unwrap(); // nobody wants it
        let e = w.publish_bytes(Target::All, "s", "other", b"4").unwrap_err();
        assert_eq!(e, PublishError::QueueOverflow, "unqueued copies still count against max_queue_len");
        assert_eq!(w.dispatch().unwrap(), 4);
        assert_eq!(*seen.lock().unwrap(), [b"1".to_vec(), b"2".to_vec()], "in publish order, not the earlier one");
        let st = w.stats();
        assert_eq!((st.published, st.delivered, st.callbacks_run, st.overflows), (4, 4, 2, 1));
        assert_eq!(w.dispatch().unwrap(), 0);
        drop(w);
        let _ = std::fs::remove_dir_all(d);
    }
}
