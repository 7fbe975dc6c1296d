//! Publishing a burst with one commit: [`Batch`].

use super::Worker;
use crate::error::PublishError;
use crate::event::{Payload, Target};
use crate::message::Ext;

/// A burst of publishes that receivers see at the latest when the batch ends, with one
/// commit and at most one wake-up per parked receiver for the whole burst.
///
/// Made by [`Worker::batch`]. Each [`Batch::publish`] is a [`Worker::publish`] (same
/// encoding, routing, errors and per-publisher order), except that on the shared-memory
/// transport the records it writes into the receivers' rings stay uncommitted: the batch's
/// end (dropping it, or [`Batch::end`]) commits them all with one store per ring, issues the
/// wake handshake's fence once, and writes the eventfd of each receiver found parked once.
/// Without a batch, every publish commits, fences and checks every receiver's parked flag,
/// and a receiver that drains faster than the publisher refills it is woken again and
/// again during one burst.
///
/// What a batch changes, precisely:
/// - **Visibility.** An event of a batch reaches the other workers no later than the end of
///   the batch. It can be seen earlier when the batch commits early: when a receiver's ring
///   fills (the batch commits what it wrote, so that the receiver can make room; the rest
///   waits in that receiver's backlog and is written and committed as room appears, as
///   without a batch), when a unique event is written into a ring, and at this worker's next
///   library call other than a batch's publish. Keep batches short where latency matters:
///   the first event waits for the last.
/// - **Wake-ups.** A batch that fits the receivers' rings wakes each parked receiver at most
///   once. A batch longer than a ring flows instead of overflowing, at about one wake-up per
///   ring-full for each receiver it does not fit.
/// - **Nothing else.** Order, loss accounting, self-delivery, the errors and the statistics
///   are those of the same publishes without a batch. On the socket transport, before
///   attach and in testing mode a batch is plain publishes.
/// - **A leaked batch** (`std::mem::forget`) commits at this worker's next library call
///   (publish, dispatch, wait, flush or close), not never.
///
/// # Examples
///
/// ```
/// # use worker_events::{Events, Options, Target, Wid};
/// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
/// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
/// let mut batch = w.batch();
/// for version in 0..16u32 {
///     batch.publish(Target::All, "config", "version", &version).unwrap();
/// }
/// batch.publish_bytes(Target::All, "config", "reloaded", b"").unwrap();
/// batch.end(); // or let it drop
/// assert_eq!(w.stats().published, 17);
/// ```
#[must_use = "a batch's events are committed when it ends; drop it or call `end`"]
pub struct Batch<'w> {
    worker: &'w mut Worker,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

impl Worker {
    /// Start a [`Batch`]: publishes that are committed, and wake parked receivers, once for
    /// the whole burst.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// let mut batch = w.batch();
    /// batch.publish(Target::All, "routes", "changed", &7u64).unwrap();
    /// drop(batch); // committed here
    /// ```
    pub fn batch(&mut self) -> Batch<'_> {
        Batch { worker: self }
    }
}

impl Batch<'_> {
    /// [`Worker::publish`] inside the batch.
    ///
    /// # Errors
    /// As [`Worker::publish`]; nothing of this event was sent when it returns an error (the
    /// batch's earlier events stay in the batch).
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid, PublishError};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true).max_payload_len(8)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// let mut batch = w.batch();
    /// batch.publish(Target::All, "s", "e", &1u64).unwrap();
    /// let err = batch.publish(Target::All, "s", "e", &[0u8; 64]).unwrap_err();
    /// assert!(matches!(err, PublishError::PayloadTooLarge { .. }));
    /// ```
    pub fn publish<T: Payload>(
        &mut self,
        target: Target<'_>,
        source: &str,
        event: &str,
        data: &T,
    ) -> Result<(), PublishError> {
        self.worker.publish_in(target, source, event, data, true)
    }

    /// [`Worker::publish_bytes`] inside the batch.
    ///
    /// # Errors
    /// As [`Worker::publish_bytes`].
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// let mut batch = w.batch();
    /// batch.publish_bytes(Target::All, "cache", "purge", b"k1").unwrap();
    /// batch.publish_bytes(Target::All, "cache", "purge", b"k2").unwrap();
    /// ```
    pub fn publish_bytes(
        &mut self,
        target: Target<'_>,
        source: &str,
        event: &str,
        data: &[u8],
    ) -> Result<(), PublishError> {
        self.worker.publish_bytes_with(target, source, event, data, Ext::None, true)
    }

    /// End the batch now: commit its events and wake the parked receivers (what dropping
    /// it does).
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// let mut batch = w.batch();
    /// batch.publish(Target::All, "s", "e", &1u8).unwrap();
    /// batch.end();
    /// ```
    pub fn end(self) {
        // Drop does it.
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        // A fork child's copy of the worker commits nothing of its parent's (its publishes
        // were refused; what the parent left uncommitted is the parent's to commit).
        if !self.worker.forked() {
            self.worker.path.end_batch();
        }
    }
}
