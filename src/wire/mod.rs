//! What the control channel and the socket transport share, below both: the length-prefixed
//! frame codec ([`frame`]) and the bounded frame queues and inbox of a connection ([`queue`]).
//! Neither `control` nor `transport` imports the other; they meet here.

pub(crate) mod frame;
pub(crate) mod queue;
pub(crate) mod unacked;

use std::os::fd::BorrowedFd;
use std::time::Instant;

use queue::OutQueue;

/// The other end of a control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// The broker (seen from a client).
    Broker,
    /// The worker in this slot (seen from the broker).
    Slot(u32),
}

/// An attached connection that may carry data frames: its peer and a connection id that is
/// never reused by this process (a queue rewinds when the id it writes to changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    pub peer: Peer,
    pub conn: u64,
}

/// The socket transport's side of the control connections; the control channel calls it.
pub(crate) trait DataPlane {
    /// A data frame (`EVENT`, `DELIVER` or `LOST`) arrived on `from`.
    fn receive(&mut self, from: Link, kind: u8, body: &[u8]);
    /// (broker) The worker on `from` acknowledged: it has dispatched `total` data frames of
    /// that connection (an `ACK` frame; see `wire/unacked.rs`).
    fn ack(&mut self, _from: Link, _total: u64) {}
    /// (broker) A worker, process `pid`, was welcomed on `link` (before anything is written
    /// to it).
    fn welcomed(&mut self, _link: Link, _pid: i32) {}
    /// The data frames to write on `link` after its control frames; `None` when this
    /// process carries no data on the sockets.
    fn outbound(&mut self, link: Link) -> Option<&mut OutQueue>;
    /// (broker) Called once per poll with the slots that have an attached connection, before
    /// any [`DataPlane::read_budget`]: flow-control bookkeeping and expiry of the queues of
    /// slots gone for long.
    fn links_seen(&mut self, _connected: &[u32], _now: Instant) {}
    /// (broker) Bytes that may be read now from the connection of slot `from` (flow control:
    /// 0 holds that publisher back). Unlimited unless the data plane says otherwise.
    fn read_budget(&self, _from: u32) -> usize {
        usize::MAX
    }
}

/// The control channel's connections as the socket transport sees them; the control channel
/// implements it.
pub(crate) trait Connections {
    /// Call `f` for every attached connection that carries data.
    fn for_each_link(&self, f: &mut dyn FnMut(Link));
    /// Write what the sockets take now: control frames, then the data frames `data` has for
    /// each link.
    fn write(&mut self, data: &mut dyn DataPlane);
}

/// What a broker hands attaching workers in WELCOME.
pub(crate) enum Offer<'a> {
    /// Nothing yet: attaches are refused.
    Nothing,
    /// Shared memory: the region memfd and every slot's eventfd (`SCM_RIGHTS`).
    Shm { region_fd: BorrowedFd<'a>, eventfds: Vec<BorrowedFd<'a>>, epoch: u64, region_id: u64 },
    /// The socket transport: events ride the connections; `broker_id` tells brokers apart.
    Socket { epoch: u64, broker_id: u64 },
}
