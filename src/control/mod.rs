//! The control channel: connections, broker election and the attach protocol. It holds no
//! event queues: on the socket transport the data frames it reads go to, and the frames it
//! writes come from, a [`DataPlane`] the caller passes in (see `wire/`).
//!
//! Attach: a client connects, sends HELLO (protocol and layout versions, slot, pid, and every
//! option that must match, [`AttachTerms`]); the broker checks the peer's uid
//! (`SO_PEERCRED`), the slot (free, also of HELLOs read in the same poll) and the options
//! (a refusal names each one that differs), and answers WELCOME with what the data path offers (on shared memory the region memfd and
//! every slot's eventfd, `SCM_RIGHTS`), or REJECT with a reason. The client checks the
//! broker's uid the same way. Unique events travel as UNIQUE frames, acknowledged by
//! UNIQUE_ACK. Election and failover: `election.rs`; the client and broker halves of
//! [`Control::poll`]: `client.rs`, `broker.rs`; frame layouts: `protocol.rs`.

mod broker;
mod client;
mod divert;
mod election;
mod inspect;
mod lockfile;
mod protocol;

use std::cell::Cell;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) use election::STUCK_AFTER;
pub(crate) use election::lock_path;
#[cfg(feature = "fuzzing")]
pub(crate) use inspect::parse_reply as parse_inspect_reply;
pub(crate) use inspect::request as inspect_request;
#[cfg(feature = "fuzzing")]
pub(crate) use protocol::parse_ack;
pub(crate) use protocol::{ShmWelcome, Welcome};

use crate::error::{Error, Result};
use crate::layout::Geometry;
use crate::options::AttachTerms;
use crate::sys::{self, Epoll};
use crate::wire::frame::{FrameReader, FrameWriter};
use crate::wire::queue::flush_conn;
use crate::wire::{Connections, DataPlane, Link, Offer, Peer};
use election::{Election, LockFile};
pub(crate) use lockfile::remove_files;
use protocol::Flavor;

/// Delay between connection attempts while no broker answers.
const RETRY: Duration = Duration::from_millis(5);
/// A client whose HELLO has no answer after this long reconnects: the broker is stuck, and
/// its listening socket may have been replaced by the worker that took over meanwhile.
const HELLO_TIMEOUT: Duration = Duration::from_millis(500);

/// Epoll tokens.
pub(crate) const TOKEN_EVENTFD: u64 = 0;
pub(crate) const TOKEN_LISTENER: u64 = 1;
pub(crate) const TOKEN_CLIENT: u64 = 2;
/// The control timer (heartbeats, stuck-broker and lock-file checks): its readiness makes
/// the control channel due.
pub(crate) const TOKEN_TIMER: u64 = 3;
const TOKEN_CONN_BASE: u64 = 16;

/// Something the worker must act on.
pub(crate) enum CtlEvent {
    /// We won the election: prepare the data path, then call [`Control::serve`].
    Elected,
    /// The broker accepted us.
    Welcome(Welcome),
    /// The broker refused us.
    Rejected(String),
    /// The connection to the broker broke (it died or closed it).
    BrokerLost,
    /// (broker) A unique event from the worker in `slot`, on connection `conn` (the id
    /// [`Control::ack_unique`] takes).
    Unique { slot: u32, conn: u64, id: u64, hash: Vec<u8>, msg: Vec<u8> },
    /// (client) The broker handled our unique events up to `id`.
    UniqueAck(u64),
    /// The privileged agent's unique-diversion patterns changed (pushed by the broker, or,
    /// as the broker, set by the agent): they replace the previous list.
    Divert(crate::divert::Patterns),
}

struct Conn {
    /// Never reused by this process (see [`Link`]).
    id: u64,
    fd: sys::ParentOnly,
    rd: FrameReader,
    wr: FrameWriter,
    slot: Option<u32>,
    pid: i32,
    /// When it was opened (a client gives up on a HELLO unanswered for [`HELLO_TIMEOUT`]).
    opened: Instant,
    /// Close once the writer has drained (after a REJECT).
    closing: bool,
    /// (broker) Its epoll token.
    token: u64,
    /// (broker) Held back by flow control: out of the epoll set, not read.
    held: bool,
    /// (broker) Accepted over [`broker::MAX_UNATTACHED`]: closed unless its first read
    /// brings a HELLO that attaches it.
    probation: bool,
}

enum Role {
    /// No broker connection; retry at `next_retry`.
    Detached,
    /// Connected to the broker; `welcomed` with the data path it announced once attached.
    Client { conn: Conn, welcomed: Option<Flavor>, fds: Vec<OwnedFd> },
    /// We are the broker.
    Broker { listener: sys::ParentOnly, conns: Vec<Conn>, next_token: u64 },
}

pub(crate) struct Control {
    path: PathBuf,
    lock: LockFile,
    /// Device and inode of `lock` (compared with the path's, see `lockfile.rs`).
    lock_id: sys::FileId,
    /// Lock files we moved off (removed or replaced at the path): kept open so that peers
    /// still using them see our locks.
    retired: Vec<LockFile>,
    /// When to compare the lock file at the path with ours next.
    next_lock_check: Instant,
    /// The replaced-lock-file condition was reported (reported once).
    lock_warned: bool,
    /// Periodic timer: a broker's heartbeat, the others' stuck-broker and lock-file checks.
    timer: OwnedFd,
    timer_registered: bool,
    slot: u32,
    geo: Geometry,
    /// The options HELLO carries and the broker compares.
    terms: AttachTerms,
    preferred: bool,
    allowed_uids: Vec<u32>,
    max_frame: usize,
    role: Role,
    started: Instant,
    next_retry: Instant,
    was_attached: bool,
    /// (broker) When `accept` was last tried.
    last_accept: Instant,
    /// Id of the next connection.
    next_conn: u64,
    election: Election,
    /// The agent's unique-diversion patterns (`divert.rs`).
    divert: divert::DivertState,
    /// Per slot, the `CLOCK_MONOTONIC` nanoseconds until which the last positive answer of
    /// [`Control::slot_alive`] is reused by [`Control::slot_alive_recent`] (0: none).
    alive_until: Vec<Cell<u64>>,
}

/// How long [`Control::slot_alive_recent`] reuses a "this slot's lock is held" answer: a
/// unique-event target is checked with one `fcntl` at most once per millisecond instead of
/// once per event (ARCHITECTURE.md §G4, "unique target liveness").
pub(crate) const ALIVE_REUSE_NS: u64 = 1_000_000;

impl Control {
    /// Open the lock file and take this slot's lock.
    pub(crate) fn new(
        path: &Path,
        slot: u32,
        geo: Geometry,
        terms: AttachTerms,
        preferred: bool,
        allowed_uids: Vec<u32>,
        max_frame: usize,
    ) -> Result<Control> {
        lockfile::check_dir(path, &allowed_uids)?;
        let lock_path = election::lock_path(path);
        // A lock file created here while a broker serves means the running deployment's one
        // was removed: that broker refuses our HELLO (it names its own lock file), see
        // `lockfile.rs`.
        let (lock, lock_id, _created) =
            LockFile::open(&lock_path, &allowed_uids).map_err(|e| Error::io("opening the lock file", e))?;
        if !lock.try_slot(slot).map_err(|e| Error::io("locking the worker slot", e))? {
            return Err(Error::WidInUse(geo.wid_of(slot)));
        }
        let timer = sys::timerfd(election::CHECK_INTERVAL).map_err(|e| Error::io("creating the control timer", e))?;
        let now = Instant::now();
        Ok(Control {
            path: path.to_path_buf(),
            lock,
            lock_id,
            retired: Vec::new(),
            next_lock_check: now + election::CHECK_INTERVAL,
            lock_warned: false,
            timer,
            timer_registered: false,
            slot,
            geo,
            terms,
            preferred,
            allowed_uids,
            max_frame,
            role: Role::Detached,
            started: now,
            next_retry: now,
            was_attached: false,
            last_accept: now,
            next_conn: 1,
            election: Election::default(),
            divert: divert::DivertState::default(),
            alive_until: (0..geo.slots).map(|_| Cell::new(0)).collect(),
        })
    }

    pub(crate) fn is_broker(&self) -> bool {
        matches!(self.role, Role::Broker { .. })
    }

    pub(crate) fn is_attached_client(&self) -> bool {
        matches!(self.role, Role::Client { welcomed: Some(_), .. })
    }

    /// Is slot `slot` held by a live process (its lock byte is held)? Our own slot: true.
    /// One `fcntl` per call.
    pub(crate) fn slot_alive(&self, slot: u32) -> bool {
        slot == self.slot || self.lock.slot_held_by_other(slot)
    }

    /// [`Control::slot_alive`] for choosing where a unique event goes, at most one `fcntl`
    /// per slot per [`ALIVE_REUSE_NS`]: a "held" answer is reused for that long (a "free"
    /// one never is). So a worker killed less than a millisecond after a publisher last
    /// checked it may still be picked for that millisecond's unique events: they wait in its
    /// ring, which its successor resumes (as for an event written just before the kill),
    /// rather than going to a live worker at once.
    /// `now` is `CLOCK_MONOTONIC` in nanoseconds ([`sys::monotonic_ns`]).
    pub(crate) fn slot_alive_recent(&self, slot: u32, now: u64) -> bool {
        if slot == self.slot {
            return true;
        }
        let until = self.alive_until.get(slot as usize);
        if until.is_some_and(|u| now < u.get()) {
            return true;
        }
        let alive = self.lock.slot_held_by_other(slot);
        if let Some(u) = until {
            u.set(if alive { now.saturating_add(ALIVE_REUSE_NS) } else { 0 });
        }
        alive
    }

    /// (client) Queue a unique event for the broker; the next write sends it
    /// ([`Connections::write`], or the next poll). False when not attached to a broker (the
    /// caller keeps the event and resends it).
    ///
    /// Never written here: on the socket transport the connection also carries data frames,
    /// and a control frame written while the socket has taken only part of a data frame
    /// would land inside it (the peer would parse a corrupt frame, then garbage). Only
    /// `flush_conn` (`wire/queue.rs`) writes a connection that carries data.
    pub(crate) fn send_unique(&mut self, id: u64, hash: &[u8], msg: &[u8]) -> bool {
        let Role::Client { conn, welcomed: Some(_), .. } = &mut self.role else { return false };
        protocol::unique(&mut conn.wr, id, hash, msg);
        true
    }

    /// (broker) Acknowledge unique events up to `id` on connection `conn`: queued, and
    /// written by the next write or poll (never here, as [`Control::send_unique`]). False
    /// when that connection is gone (its worker resends to whoever it reaches next).
    pub(crate) fn ack_unique(&mut self, conn: u64, id: u64) -> bool {
        let Role::Broker { conns, .. } = &mut self.role else { return false };
        let Some(c) = conns.iter_mut().find(|c| c.id == conn && c.slot.is_some() && !c.closing) else {
            return false;
        };
        protocol::unique_ack(&mut c.wr, id);
        true
    }

    /// How long the caller may sleep before [`Control::poll`] has something to retry (a
    /// reconnection, or output the sockets did not take yet; `data_output`: the data path
    /// has some).
    pub(crate) fn retry_in(&self, now: Instant, data_output: bool) -> Option<Duration> {
        match &self.role {
            Role::Detached => Some(self.next_retry.saturating_duration_since(now)),
            Role::Client { conn, welcomed: None, .. } => {
                Some((conn.opened + HELLO_TIMEOUT).saturating_duration_since(now))
            }
            _ if data_output || self.has_output() => Some(RETRY.min(Duration::from_millis(1))),
            // A connection held back by flow control is out of the epoll set: look again soon.
            Role::Broker { conns, .. } if conns.iter().any(|c| c.held) => Some(Duration::from_millis(1)),
            _ => None,
        }
    }

    /// Control frames queued that the sockets have not taken yet (data frames are the data
    /// path's to report).
    pub(crate) fn has_output(&self) -> bool {
        match &self.role {
            Role::Detached => false,
            Role::Client { conn, .. } => conn.wr.pending(),
            Role::Broker { conns, .. } => conns.iter().any(|c| c.wr.pending()),
        }
    }

    /// Become the broker: listen on the socket path. Called after [`CtlEvent::Elected`].
    pub(crate) fn serve(&mut self, epoll: &Epoll) -> Result<()> {
        let listener = sys::listen_unix(&self.path).map_err(|e| Error::io("listening on the control socket", e))?;
        self.serve_on(listener, epoll)
    }

    /// Become the broker in place of a stuck one (we won the region's heartbeat swap and its
    /// next epoch): listen on a fresh socket renamed over the path, whose old socket still
    /// accepts connections nobody reads. The lock byte stays the stuck broker's until it lets
    /// go ([`Control::adopt_broker_lock`]).
    pub(crate) fn serve_over(&mut self, epoll: &Epoll) -> Result<()> {
        let listener =
            sys::listen_unix_over(&self.path).map_err(|e| Error::io("listening on the control socket", e))?;
        self.serve_on(listener, epoll)?;
        self.adopt_broker_lock();
        Ok(())
    }

    fn serve_on(&mut self, listener: OwnedFd, epoll: &Epoll) -> Result<()> {
        epoll.add(listener.as_fd(), TOKEN_LISTENER).map_err(|e| Error::io("epoll_ctl", e))?;
        self.drop_role(epoll);
        self.served();
        self.divert_serving();
        self.set_timer(election::BEAT_INTERVAL);
        tracing::info!(slot = self.slot, pid = std::process::id(), path = %self.path.display(), "listening as the broker");
        let listener = sys::ParentOnly::new(listener);
        self.role = Role::Broker { listener, conns: Vec::new(), next_token: TOKEN_CONN_BASE };
        Ok(())
    }

    /// The control timer was reported ready: read it (so it stops being readable).
    pub(crate) fn timer_fired(&self) {
        sys::timerfd_read(self.timer.as_fd());
    }

    fn set_timer(&self, period: Duration) {
        if let Err(e) = sys::timerfd_set(self.timer.as_fd(), period) {
            tracing::warn!(error = %e, "cannot set the control timer");
        }
    }

    fn drop_role(&mut self, epoll: &Epoll) {
        if self.is_broker() {
            self.set_timer(election::CHECK_INTERVAL);
        }
        match std::mem::replace(&mut self.role, Role::Detached) {
            Role::Detached => {}
            Role::Client { conn, .. } => epoll.delete(conn.fd.as_fd()),
            Role::Broker { listener, conns, .. } => {
                epoll.delete(listener.as_fd());
                for c in conns {
                    epoll.delete(c.fd.as_fd());
                }
            }
        }
    }

    fn new_conn(&mut self, fd: OwnedFd) -> Conn {
        let id = self.next_conn;
        self.next_conn += 1;
        Conn {
            id,
            fd: sys::ParentOnly::new(fd),
            rd: FrameReader::new(self.max_frame),
            wr: FrameWriter::default(),
            slot: None,
            pid: 0,
            opened: Instant::now(),
            closing: false,
            token: 0,
            held: false,
            probation: false,
        }
    }

    /// Make progress: connect, read frames, accept and answer attaches. `offer` is what a
    /// broker gives attaching workers; `data` takes the data frames read and gives the data
    /// frames to write (socket transport).
    ///
    /// `listener_ready`: epoll reported the listening socket readable. A broker also tries
    /// `accept` every millisecond without it, so a busy-polling broker (which does not ask
    /// epoll every pass) spends no system call per pass on an empty backlog.
    pub(crate) fn poll(
        &mut self,
        now: Instant,
        epoll: &Epoll,
        offer: &Offer<'_>,
        listener_ready: bool,
        data: Option<&mut dyn DataPlane>,
    ) -> Vec<CtlEvent> {
        let mut none = NoData;
        let data: &mut dyn DataPlane = match data {
            Some(d) => d,
            None => &mut none,
        };
        self.poll_with(now, epoll, offer, listener_ready, data)
    }

    fn poll_with(
        &mut self,
        now: Instant,
        epoll: &Epoll,
        offer: &Offer<'_>,
        listener_ready: bool,
        data: &mut dyn DataPlane,
    ) -> Vec<CtlEvent> {
        let mut events = Vec::new();
        if !self.timer_registered {
            // Level-triggered: readable until `timer_fired` reads it, so an expiry whose
            // readiness a dispatch pass did not pass on is reported again.
            self.timer_registered = epoll.add(self.timer.as_fd(), TOKEN_TIMER).is_ok();
        }
        if now >= self.next_lock_check {
            self.next_lock_check = now + election::CHECK_INTERVAL;
            self.check_lock_file();
        }
        match self.role {
            Role::Detached => {
                if self.poll_detached(now, epoll, &mut events) {
                    return self.poll_with(now, epoll, offer, listener_ready, data);
                }
            }
            Role::Client { .. } => self.poll_client(now, epoll, data, &mut events),
            Role::Broker { .. } => self.poll_broker(now, epoll, offer, listener_ready, data, &mut events),
        }
        events
    }
}

/// The data plane of a process that carries no data on the sockets.
struct NoData;

impl DataPlane for NoData {
    fn receive(&mut self, _from: Link, _kind: u8, _body: &[u8]) {}

    fn outbound(&mut self, _link: Link) -> Option<&mut crate::wire::queue::OutQueue> {
        None
    }
}

impl Connections for Control {
    fn for_each_link(&self, f: &mut dyn FnMut(Link)) {
        match &self.role {
            Role::Detached => {}
            Role::Client { conn, welcomed, .. } => {
                if *welcomed == Some(Flavor::Socket) {
                    f(Link { peer: Peer::Broker, conn: conn.id });
                }
            }
            Role::Broker { conns, .. } => {
                for c in conns.iter().filter(|c| !c.closing) {
                    if let Some(s) = c.slot {
                        f(Link { peer: Peer::Slot(s), conn: c.id });
                    }
                }
            }
        }
    }

    fn write(&mut self, data: &mut dyn DataPlane) {
        match &mut self.role {
            Role::Detached => {}
            Role::Client { conn, welcomed, .. } => {
                let link = Link { peer: Peer::Broker, conn: conn.id };
                let q = if *welcomed == Some(Flavor::Socket) { data.outbound(link) } else { None };
                if let Err(e) = flush_conn(&mut conn.wr, q, conn.fd.as_fd()) {
                    tracing::debug!(error = %e, "write to the broker failed");
                }
            }
            Role::Broker { conns, .. } => broker::write_conns(conns, data),
        }
    }
}
