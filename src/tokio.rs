//! A [`Worker`] driven by tokio (feature `tokio`): [`AsyncWorker`].
//!
//! The worker's fd (an epoll set) is registered with the current runtime's reactor, for
//! readability only. The worker's contract (see [`Worker`]) is that the fd turns readable,
//! with a new edge, when work comes *after a `dispatch` returned 0*; work can also be there
//! without the fd saying so (events our own `publish` queued for our callbacks, events a
//! `dispatch` found and left for the next call, what a callback published). So
//! [`AsyncWorker::dispatch`] first dispatches, and waits for readiness only after a
//! `dispatch` that returned 0; after a wake-up it dispatches again, and clears tokio's
//! readiness only when that `dispatch` also returned 0 (tokio clears nothing if an edge
//! came in the meantime). A wake-up can therefore not be lost in either direction, and
//! `dispatch` never returns 0.
//!
//! Built only on the public API of [`Worker`].

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use ::tokio::io::Interest;
use ::tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};
use crate::worker::Worker;

/// A [`Worker`] whose fd is registered with the current tokio runtime: `dispatch().await`
/// sleeps until there is work, then runs it. Works on a current-thread runtime (built in
/// each worker process after `fork()`, as the prefork model does) as on a multi-thread one.
///
/// **Publishing.** Between dispatches, publish through [`AsyncWorker::worker_mut`]; the
/// next [`AsyncWorker::dispatch`] runs whatever that queued for this worker's own callbacks
/// at once (no wake-up needed). Inside a callback, publish through the
/// [`Context`](crate::context::Context) of [`Worker::subscribe_with`]. Request handlers running as
/// other tasks hand what they publish to the task that owns the `AsyncWorker`, for example
/// over a channel polled in the same `select!` as `dispatch()` (which is cancel-safe): no
/// lock is held while waiting, so nothing can deadlock.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use worker_events::tokio::AsyncWorker;
/// use worker_events::{Events, Options, Target, Wid};
///
/// let dir = std::env::temp_dir().join(format!("we-doc-tokio-{}", std::process::id()));
/// let events = Events::new(Options::new(dir.join("ev.sock")).workers(1)).unwrap();
/// // After fork(), in each worker process: a current-thread runtime of its own.
/// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
/// rt.block_on(async {
///     let mut w = events.init_worker(Wid::Worker(0)).unwrap();
///     w.subscribe("cache", "purge", |ev| println!("purge {:?}", ev.data_bytes()));
///     let mut aw = AsyncWorker::new(w).unwrap();
///     let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
///     // A request handler elsewhere: it hands its key to the owner of the worker.
///     tokio::spawn(async move { tx.send(b"k1".to_vec()).unwrap() });
///     let mut purged = 0;
///     while purged < 1 {
///         tokio::select! {
///             r = aw.dispatch() => purged += r.unwrap(),
///             Some(key) = rx.recv() => aw.worker_mut().publish_bytes(Target::All, "cache", "purge", &key).unwrap(),
///         }
///     }
///     let w = aw.into_inner(); // deregistered; a plain Worker again
///     # drop(w);
/// });
/// # let _ = std::fs::remove_dir_all(dir);
/// ```
#[derive(Debug)]
pub struct AsyncWorker {
    fd: AsyncFd<Worker>,
}

impl AsyncWorker {
    /// Register `worker`'s fd with the current runtime's reactor.
    ///
    /// # Errors
    /// [`Error::Io`] when the reactor refuses the fd (the worker is dropped).
    ///
    /// # Panics
    /// Outside a tokio runtime with I/O enabled (`enable_io` / `enable_all`), as tokio's
    /// `AsyncFd` does.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid, tokio::AsyncWorker};
    /// # let dir = std::env::temp_dir().join(format!("we-doc-tokio-new-{}", std::process::id()));
    /// let events = Events::new(Options::new(dir.join("ev.sock")).workers(1)).unwrap();
    /// let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    /// let _guard = rt.enter();
    /// let aw = AsyncWorker::new(events.init_worker(Wid::Worker(0)).unwrap()).unwrap();
    /// assert!(aw.worker().is_broker());
    /// # drop(aw); let _ = std::fs::remove_dir_all(dir);
    /// ```
    pub fn new(worker: Worker) -> Result<AsyncWorker> {
        // SAFETY: `Worker::as_raw_fd` is the worker's epoll descriptor: created with the
        // worker, never replaced, closed only when the worker is dropped. The `AsyncFd`
        // owns the worker, so the descriptor stays open and the same until `into_inner`
        // or drop, both of which deregister it before the worker (and its fd) can go.
        match unsafe { AsyncFd::register_with_interest(worker, Interest::READABLE) } {
            Ok(fd) => Ok(AsyncWorker { fd }),
            Err(e) => Err(Error::io("register the worker's fd with the tokio reactor", e.into_parts().1)),
        }
    }

    /// Wait until there is work, then run it: the number of events dispatched, never 0.
    /// Cancel-safe: a `dispatch()` dropped while waiting (a `select!` that took another
    /// branch) loses nothing; the next call finds the work.
    ///
    /// # Errors
    /// As [`Worker::dispatch`], plus [`Error::Io`] if the reactor fails.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid, tokio::AsyncWorker};
    /// # let dir = std::env::temp_dir().join(format!("we-doc-tokio-d-{}", std::process::id()));
    /// # let events = Events::new(Options::new(dir.join("ev.sock")).workers(1)).unwrap();
    /// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    /// rt.block_on(async {
    ///     let mut aw = AsyncWorker::new(events.init_worker(Wid::Worker(0)).unwrap()).unwrap();
    ///     aw.worker_mut().subscribe("a", "b", |_| {});
    ///     aw.worker_mut().publish_bytes(Target::Current, "a", "b", b"").unwrap();
    ///     assert_eq!(aw.dispatch().await.unwrap(), 1);
    ///     let idle = tokio::time::timeout(std::time::Duration::from_millis(20), aw.dispatch()).await;
    ///     assert!(idle.is_err(), "nothing to do: it waits");
    /// });
    /// # let _ = std::fs::remove_dir_all(dir);
    /// ```
    pub async fn dispatch(&mut self) -> Result<usize> {
        // Work may be waiting without the fd being readable: look first.
        let n = self.fd.get_mut().dispatch()?;
        if n > 0 {
            // A worker that always has work must still let the runtime's other tasks run.
            ::tokio::task::coop::consume_budget().await;
            return Ok(n);
        }
        loop {
            // That `dispatch` returned 0: the wake-up is armed, new work makes a new edge.
            let mut ready = self.fd.readable_mut().await.map_err(|e| Error::io("AsyncFd::readable", e))?;
            let n = ready.get_inner_mut().dispatch()?;
            if n > 0 {
                // Readiness kept: the next call dispatches again before it waits.
                return Ok(n);
            }
            // Only now, after a `dispatch` that returned 0 (and re-armed), may readiness
            // go: tokio keeps it if an edge came after this guard's wake-up.
            ready.clear_ready();
        }
    }

    /// The worker (stats, id, role).
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid, tokio::AsyncWorker};
    /// # let dir = std::env::temp_dir().join(format!("we-doc-tokio-w-{}", std::process::id()));
    /// # let events = Events::new(Options::new(dir.join("ev.sock")).workers(1)).unwrap();
    /// # let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    /// # let _guard = rt.enter();
    /// let aw = AsyncWorker::new(events.init_worker(Wid::Worker(0)).unwrap()).unwrap();
    /// assert_eq!(aw.worker().wid(), Wid::Worker(0));
    /// # drop(aw); let _ = std::fs::remove_dir_all(dir);
    /// ```
    pub fn worker(&self) -> &Worker {
        self.fd.get_ref()
    }

    /// The worker, to publish or subscribe between dispatches (what it queues for its own
    /// callbacks runs at the next [`AsyncWorker::dispatch`]).
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid, tokio::AsyncWorker};
    /// # let dir = std::env::temp_dir().join(format!("we-doc-tokio-wm-{}", std::process::id()));
    /// # let events = Events::new(Options::new(dir.join("ev.sock")).workers(1)).unwrap();
    /// # let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    /// # let _guard = rt.enter();
    /// let mut aw = AsyncWorker::new(events.init_worker(Wid::Worker(0)).unwrap()).unwrap();
    /// aw.worker_mut().publish_bytes(Target::All, "a", "b", b"x").unwrap();
    /// # drop(aw); let _ = std::fs::remove_dir_all(dir);
    /// ```
    pub fn worker_mut(&mut self) -> &mut Worker {
        self.fd.get_mut()
    }

    /// Deregister from the reactor and give the worker back.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid, tokio::AsyncWorker};
    /// # let dir = std::env::temp_dir().join(format!("we-doc-tokio-ii-{}", std::process::id()));
    /// # let events = Events::new(Options::new(dir.join("ev.sock")).workers(1)).unwrap();
    /// # let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    /// # let _guard = rt.enter();
    /// let aw = AsyncWorker::new(events.init_worker(Wid::Worker(0)).unwrap()).unwrap();
    /// let mut w = aw.into_inner();
    /// assert_eq!(w.dispatch().unwrap(), 0);
    /// # drop(w); let _ = std::fs::remove_dir_all(dir);
    /// ```
    pub fn into_inner(self) -> Worker {
        self.fd.into_inner()
    }
}

impl AsFd for AsyncWorker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl AsRawFd for AsyncWorker {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }
}
