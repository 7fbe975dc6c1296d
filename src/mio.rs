//! `Worker` as a [`mio::event::Source`] (feature `mio`): its fd, registered for
//! readability. Register it with `Interest::READABLE`; when the poll reports its token,
//! call [`Worker::dispatch`](crate::worker::Worker::dispatch) until it returns 0 (mio registers
//! edge-triggered, and the worker's fd gets a new edge for work that comes after a
//! `dispatch` returned 0). Work queued by this worker for its own callbacks (its own
//! `publish`es between dispatches) makes no edge: dispatch once after publishing too, as
//! `examples/mio_loop.rs` does. Built only on the public API of `Worker`.

use std::io;
use std::os::fd::AsRawFd;

use ::mio::unix::SourceFd;
use ::mio::{Interest, Registry, Token};

use crate::worker::Worker;

/// ```
/// use mio::{Events as MioEvents, Interest, Poll, Token};
/// use worker_events::{Events, Options, Target, Wid};
///
/// let dir = std::env::temp_dir().join(format!("we-doc-mio-{}", std::process::id()));
/// let events = Events::new(Options::new(dir.join("ev.sock")).workers(1)).unwrap();
/// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
/// let mut poll = Poll::new().unwrap();
/// poll.registry().register(&mut w, Token(0), Interest::READABLE).unwrap();
/// w.subscribe("a", "b", |_| {});
/// w.publish_bytes(Target::All, "a", "b", b"x").unwrap();
/// while w.dispatch().unwrap() > 0 {} // our own event (and arm the wake-up)
/// poll.registry().deregister(&mut w).unwrap();
/// # drop(w); let _ = std::fs::remove_dir_all(dir);
/// ```
impl ::mio::event::Source for Worker {
    fn register(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        SourceFd(&self.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        SourceFd(&self.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        SourceFd(&self.as_raw_fd()).deregister(registry)
    }
}
