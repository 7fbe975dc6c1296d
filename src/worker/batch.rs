//! Publishing a burst with one commit: [`Batch`].

use super::Worker;
use crate::error::PublishError;
use crate::event::{Payload, Target};

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
        self.deferred(|w| w.publish(target, source, event, data))
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
        self.deferred(|w| w.publish_bytes(target, source, event, data))
    }

    /// Run a publish with the data path leaving its writes uncommitted. The flag is cleared
    /// however the publish returns, a panic included (a payload's `Serialize` may panic: it
    /// is caught here only to clear the flag, then resumed), so it never outlives the call:
    /// a later plain publish is never left uncommitted.
    fn deferred(&mut self, publish: impl FnOnce(&mut Worker) -> Result<(), PublishError>) -> Result<(), PublishError> {
        self.worker.path.set_defer(true);
        let worker = &mut *self.worker;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| publish(worker)));
        self.worker.path.set_defer(false);
        r.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
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

#[cfg(all(test, not(loom)))]
mod tests {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::time::Duration;

    use crate::event::{Target, Wid};
    use crate::options::{Options, Transport};
    use crate::worker::Events;

    /// A payload whose serialization panics.
    struct Boom;

    impl rkyv::Archive for Boom {
        type Archived = u8;
        type Resolver = ();
        fn resolve(&self, (): (), out: rkyv::Place<u8>) {
            out.write(0);
        }
    }

    impl<S: rkyv::rancor::Fallible + ?Sized> rkyv::Serialize<S> for Boom {
        fn serialize(&self, _: &mut S) -> Result<(), S::Error> {
            panic!("a payload whose Serialize panics");
        }
    }

    /// A batch's publish that panics (caught by the caller), then the guard leaked: the
    /// next plain publish is committed at once, as without the batch.
    #[test]
    fn a_panic_inside_a_batch_publish_leaves_no_deferral_behind() {
        let d = std::env::temp_dir().join(format!("we-batch-panic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let opts = Options::new(d.join("ev.sock")).workers(2).transport(Transport::SharedMemory);
        let mut w = Events::new(opts).unwrap().init_worker(Wid::Worker(0)).unwrap();
        assert!(w.wait_ready(Duration::from_secs(5)).unwrap());
        let mut batch = w.batch();
        batch.publish_bytes(Target::All, "s", "e", b"before").unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| batch.publish(Target::All, "s", "e", &Boom)));
        assert!(r.is_err(), "the panic reaches the caller");
        std::mem::forget(batch);
        w.publish_bytes(Target::All, "s", "e", b"after").unwrap();
        let port = w.path.shm().expect("shared memory");
        assert_eq!(port.batch_state(), (false, false), "(deferring, records left uncommitted)");
        drop(w);
        let _ = std::fs::remove_dir_all(d);
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
