//! The control channel: broker election, attach, and (later) unique events.
//!
//! Election: the lock file `<listening>.lock` holds one open-file-description lock per
//! role: byte 0 is the broker, byte `1 + slot` is worker slot `slot`. These behave like
//! `flock` (the kernel drops them when the holder dies, however it dies) and can be queried
//! without disturbing the holder (`F_OFD_GETLK`). A worker first takes its slot byte, which
//! is what makes two live processes with one id impossible. The preferred broker
//! (`broker_id`) then takes byte 0 at once; any other worker takes it only after it has
//! failed to reach a broker for [`ELECTION_GRACE`], so the preferred one normally wins at
//! start-up while a missing or dead broker is still replaced. A worker that holds the shared
//! region (it was attached) runs at once when it loses its broker; one without a region
//! defers to live region holders (see `failover.rs`: backoff, fencing, resigning).
//!
//! Attach: a client connects, sends HELLO (protocol and layout versions, slot, pid,
//! geometry); the broker checks the peer's uid (`SO_PEERCRED`), the slot and the geometry,
//! and answers WELCOME with the region memfd and every slot's eventfd (`SCM_RIGHTS`), or
//! REJECT with a reason. The client checks the broker's uid the same way.

mod failover;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::wire::frame::{Body, FrameReader, FrameWriter, PROTOCOL_VERSION, ReadState, kind};

use crate::error::{Error, Result};
use crate::event::MAX_UNIQUE_HASH_LEN;
use crate::layout::{Geometry, LAYOUT_VERSION};
use crate::sys::{self, Epoll};
use crate::wire::queue::{COALESCE_BYTES, Inbox, OutQueue, flush_conn};

/// How long a non-preferred worker waits for a broker before it runs for election itself.
pub(crate) const ELECTION_GRACE: Duration = Duration::from_millis(200);
/// Delay between connection attempts while no broker answers.
const RETRY: Duration = Duration::from_millis(5);
/// Longest time a broker goes without trying `accept` (see [`Control::poll`]).
const ACCEPT_INTERVAL: Duration = Duration::from_millis(1);
/// Delay after the broker refused us.
const RETRY_AFTER_REJECT: Duration = Duration::from_secs(1);

/// Epoll tokens.
pub(crate) const TOKEN_EVENTFD: u64 = 0;
pub(crate) const TOKEN_LISTENER: u64 = 1;
pub(crate) const TOKEN_CLIENT: u64 = 2;
const TOKEN_CONN_BASE: u64 = 16;

/// (socket transport) The 16 bytes ahead of the message in EVENT and DELIVER frames: the
/// publisher's incarnation (a random nonzero id per `Worker`) and its per-incarnation
/// sequence number, little-endian. Receivers drop a sequence number they have seen and turn
/// a gap (events that died with a broker) into a lost notice.
pub(crate) type Stamp = [u8; STAMP_LEN];
/// Length of a [`Stamp`]: keeps the message 16-aligned behind it.
pub(crate) const STAMP_LEN: usize = 16;
/// The stamp of an event outside any publisher's sequence (unique deliveries).
pub(crate) const UNSEQUENCED: Stamp = [0; STAMP_LEN];

/// What the broker hands out: the region memfd and every slot's eventfd.
pub(crate) struct HandOut<'a> {
    pub region_fd: RawFd,
    pub eventfds: Vec<RawFd>,
    pub epoch: u64,
    pub region_id: u64,
    pub _life: std::marker::PhantomData<&'a ()>,
}

/// The data path of a deployment, decided by its broker and learned by workers at attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Not attached yet.
    Unknown,
    /// Rings in the shared region; the control channel carries attaches and unique events.
    Shm,
    /// Every event rides the control connections, through the broker.
    Socket,
}

/// What a WELCOME hands over on the shared-memory transport.
pub(crate) struct ShmWelcome {
    pub region_fd: OwnedFd,
    pub eventfds: Vec<OwnedFd>,
    pub region_id: u64,
}

/// Something the worker must act on.
pub(crate) enum CtlEvent {
    /// We won the election: create or reuse the region, then call [`Control::serve`].
    Elected,
    /// The broker accepted us: on shared memory, the region memfd and the eventfds; `None` on
    /// the socket transport.
    /// `broker_id` tells brokers apart: the region id on shared memory, a random id per
    /// socket-transport broker.
    Welcome { shm: Option<ShmWelcome>, broker_slot: u32, epoch: u64, broker_id: u64 },
    /// The broker refused us.
    Rejected(String),
    /// The connection to the broker broke (it died or closed it).
    BrokerLost,
    /// (broker) A unique event from the worker in `slot`.
    Unique { slot: u32, id: u64, hash: Vec<u8>, msg: Vec<u8> },
    /// (client) The broker handled our unique events up to `id`.
    UniqueAck(u64),
}

struct Conn {
    fd: OwnedFd,
    rd: FrameReader,
    wr: FrameWriter,
    slot: Option<u32>,
    pid: i32,
    /// Close once the writer has drained (after a REJECT).
    closing: bool,
}

enum Role {
    /// No broker connection; retry at `next_retry`.
    Detached,
    /// Connected to the broker; `welcomed` once attached.
    Client { conn: Conn, welcomed: bool, fds: Vec<OwnedFd> },
    /// We are the broker.
    Broker { listener: OwnedFd, conns: Vec<Conn>, next_token: u64 },
}

pub(crate) struct Control {
    path: PathBuf,
    lock: OwnedFd,
    slot: u32,
    geo: Geometry,
    preferred: bool,
    allowed_uids: Vec<u32>,
    max_frame: usize,
    role: Role,
    started: Instant,
    next_retry: Instant,
    was_attached: bool,
    mode: Mode,
    /// (socket transport, broker) The epoch handed out in WELCOME.
    sock_epoch: u64,
    /// (socket transport, broker) This broker's random id, handed out in WELCOME.
    sock_id: u64,
    /// (broker) When `accept` was last tried.
    last_accept: Instant,
    /// (socket transport, client) Our "all" events for the broker; survives reconnects.
    client_out: OutQueue,
    /// (socket transport, broker) Frames for each slot, attached or not yet.
    slot_out: Vec<OutQueue>,
    /// (socket transport) Data frames received, for the worker to dispatch.
    inbox: Inbox,
    fo: failover::FailoverState,
}

impl Control {
    /// Open the lock file and take this slot's lock.
    pub(crate) fn new(
        path: &Path,
        slot: u32,
        geo: Geometry,
        preferred: bool,
        allowed_uids: Vec<u32>,
        max_frame: usize,
        max_queue_len: usize,
    ) -> Result<Control> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| Error::io("creating the directory of the listening socket", e))?;
            }
        }
        let lock_path = lock_path(path);
        let lock = sys::open_lock_file(&lock_path).map_err(|e| Error::io("opening the lock file", e))?;
        if !sys::try_lock_byte(lock.as_fd(), 1 + u64::from(slot))
            .map_err(|e| Error::io("locking the worker slot", e))?
        {
            return Err(Error::WidInUse(geo.wid_of(slot)));
        }
        let now = Instant::now();
        Ok(Control {
            path: path.to_path_buf(),
            lock,
            slot,
            geo,
            preferred,
            allowed_uids,
            max_frame,
            role: Role::Detached,
            started: now,
            next_retry: now,
            was_attached: false,
            mode: Mode::Unknown,
            sock_epoch: 0,
            sock_id: 0,
            last_accept: now,
            client_out: OutQueue::new(max_queue_len),
            slot_out: (0..geo.slots).map(|_| OutQueue::new(max_queue_len)).collect(),
            inbox: Inbox::default(),
            fo: failover::FailoverState::default(),
        })
    }

    /// The data path, as decided by the broker (ours or the one we attached to).
    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    /// (socket transport, client) Room in our outbound queue for one more event.
    pub(crate) fn client_has_room(&self) -> bool {
        !self.client_out.is_full()
    }

    /// (socket transport, client) Queue an "all" event for the broker; false when full.
    pub(crate) fn queue_event(&mut self, stamp: &Stamp, msg: &[u8]) -> bool {
        self.client_out.push(kind::EVENT, &[stamp, msg])
    }

    /// (socket transport, client) Take back the events not yet sent (on becoming the broker,
    /// or moving to shared memory): each is a [`Stamp`] followed by the message.
    pub(crate) fn take_client_out(&mut self) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        self.client_out.drain_frames(|k, body| {
            if k == kind::EVENT {
                v.push(body.to_vec());
            }
        });
        v
    }

    /// (socket transport, broker) Queue `msg` from publisher slot `from` for every slot but
    /// the publisher and ourselves. Returns how many destinations dropped it (full queues;
    /// each owes that destination a lost notice).
    pub(crate) fn broadcast(&mut self, from: u32, stamp: &Stamp, msg: &[u8]) -> u64 {
        let mut dropped = 0;
        for (t, q) in self.slot_out.iter_mut().enumerate() {
            if t as u32 == from || t as u32 == self.slot {
                continue;
            }
            dropped += u64::from(!queue_deliver(q, from, stamp, msg));
        }
        dropped
    }

    /// (socket transport, broker) Queue `msg` (from publisher slot `from`) for slot `to`;
    /// false when that queue was full (a lost notice is owed).
    pub(crate) fn deliver_to(&mut self, to: u32, from: u32, msg: &[u8]) -> bool {
        match self.slot_out.get_mut(to as usize) {
            Some(q) => queue_deliver(q, from, &UNSEQUENCED, msg),
            None => false,
        }
    }

    /// (socket transport, client) Events queued for the broker and not completely written.
    pub(crate) fn client_queued(&self) -> u64 {
        if self.mode == Mode::Socket && !self.is_broker() { self.client_out.len() as u64 } else { 0 }
    }

    /// (socket transport, broker) The random id this broker hands out in WELCOME.
    pub(crate) fn broker_id(&self) -> u64 {
        self.sock_id
    }

    /// (socket transport) A queue that has a connection to write to holds at least
    /// [`COALESCE_BYTES`]: time to write instead of waiting for `dispatch`. Queues of slots
    /// not connected are left out (they would make every publish write).
    pub(crate) fn flush_due(&self) -> bool {
        match &self.role {
            Role::Client { welcomed: true, .. } => self.client_out.pending_bytes() >= COALESCE_BYTES,
            Role::Broker { conns, .. } => conns.iter().any(|c| {
                !c.closing
                    && c.slot
                        .and_then(|s| self.slot_out.get(s as usize))
                        .is_some_and(|q| q.pending_bytes() >= COALESCE_BYTES)
            }),
            _ => false,
        }
    }

    /// (socket transport) Frames queued per slot: ours for the broker as a client, each
    /// slot's as the broker.
    pub(crate) fn queue_depths(&self) -> Vec<(u32, u64)> {
        match (&self.role, self.mode) {
            (_, Mode::Shm | Mode::Unknown) => Vec::new(),
            (Role::Broker { .. }, _) => self
                .slot_out
                .iter()
                .enumerate()
                .filter(|(t, _)| *t as u32 != self.slot)
                .map(|(t, q)| (t as u32, q.len() as u64))
                .collect(),
            _ => vec![(u32::MAX, self.client_out.len() as u64)],
        }
    }

    /// (socket transport) The data frames received so far; give the box back with
    /// [`Control::return_inbox`] once drained, to reuse its buffer.
    pub(crate) fn take_inbox(&mut self) -> Inbox {
        std::mem::take(&mut self.inbox)
    }

    /// See [`Control::take_inbox`].
    pub(crate) fn return_inbox(&mut self, inbox: Inbox) {
        if self.inbox.is_empty() {
            self.inbox = inbox;
        }
    }

    /// (socket transport) Write what the sockets take now: control frames and data frames of
    /// every attached connection. A failing connection is noticed by the next [`Control::poll`].
    pub(crate) fn flush_data(&mut self) {
        if self.mode != Mode::Socket {
            return;
        }
        match &mut self.role {
            Role::Detached => {}
            Role::Client { conn, welcomed, .. } => {
                let data = if *welcomed { Some(&mut self.client_out) } else { None };
                if let Err(e) = flush_conn(&mut conn.wr, data, conn.fd.as_fd()) {
                    tracing::debug!(error = %e, "write to the broker failed");
                }
            }
            Role::Broker { conns, .. } => {
                for c in conns.iter_mut().filter(|c| !c.closing) {
                    let data = match c.slot {
                        Some(s) => self.slot_out.get_mut(s as usize),
                        None => None,
                    };
                    if let Some(q) = data {
                        q.push_lost_notices(kind::LOST);
                        if let Err(e) = flush_conn(&mut c.wr, Some(q), c.fd.as_fd()) {
                            tracing::debug!(error = %e, slot = c.slot, "write to a worker failed");
                        }
                    } else if let Err(e) = c.wr.flush(c.fd.as_fd()) {
                        tracing::debug!(error = %e, "write to a worker failed");
                    }
                }
            }
        }
    }

    pub(crate) fn is_broker(&self) -> bool {
        matches!(self.role, Role::Broker { .. })
    }

    pub(crate) fn is_attached_client(&self) -> bool {
        matches!(self.role, Role::Client { welcomed: true, .. })
    }

    /// Is slot `slot` held by a live process (its lock byte is held)? Our own slot: true.
    pub(crate) fn slot_alive(&self, slot: u32) -> bool {
        slot == self.slot || sys::byte_locked_by_other(self.lock.as_fd(), 1 + u64::from(slot))
    }

    /// (client) Queue a unique event for the broker and write what the socket takes.
    /// False when not attached to a broker (the caller keeps the event and resends it).
    pub(crate) fn send_unique(&mut self, id: u64, hash: &[u8], msg: &[u8]) -> bool {
        let Role::Client { conn, welcomed: true, .. } = &mut self.role else { return false };
        conn.wr.frame(kind::UNIQUE, &[&id.to_le_bytes(), &(hash.len() as u16).to_le_bytes(), hash, msg]);
        if let Err(e) = conn.wr.flush(conn.fd.as_fd()) {
            tracing::debug!(error = %e, "sending a unique event to the broker failed; will resend");
        }
        true
    }

    /// (broker) Acknowledge unique events up to `id` to the worker in `slot`.
    pub(crate) fn ack_unique(&mut self, slot: u32, id: u64) {
        let Role::Broker { conns, .. } = &mut self.role else { return };
        if let Some(c) = conns.iter_mut().find(|c| c.slot == Some(slot) && !c.closing) {
            c.wr.frame(kind::UNIQUE_ACK, &[&id.to_le_bytes()]);
            let _ = c.wr.flush(c.fd.as_fd());
        }
    }

    /// How long the caller may sleep before [`Control::poll`] has something to retry
    /// (a reconnection, or output the socket did not take yet).
    pub(crate) fn retry_in(&self, now: Instant) -> Option<Duration> {
        match &self.role {
            Role::Detached => Some(self.next_retry.saturating_duration_since(now)),
            _ if self.has_output() => Some(RETRY.min(Duration::from_millis(1))),
            _ => None,
        }
    }

    /// Frames queued that the socket has not taken yet.
    pub(crate) fn has_output(&self) -> bool {
        match &self.role {
            Role::Detached => false,
            Role::Client { conn, welcomed, .. } => {
                conn.wr.pending() || (*welcomed && self.mode == Mode::Socket && self.client_out.pending_bytes() > 0)
            }
            Role::Broker { conns, .. } => conns.iter().any(|c| {
                c.wr.pending()
                    || (self.mode == Mode::Socket
                        && !c.closing
                        && c.slot
                            .and_then(|s| self.slot_out.get(s as usize))
                            .is_some_and(|q| q.pending_bytes() > 0 || (q.owes_notices() && !q.is_full())))
            }),
        }
    }

    /// Become the broker: listen on the socket path. Called after [`CtlEvent::Elected`].
    /// `mode` is the data path this broker runs (and hands out); `epoch` its broker epoch.
    pub(crate) fn serve(&mut self, epoll: &Epoll, mode: Mode, epoch: u64) -> Result<()> {
        let listener = sys::listen_unix(&self.path).map_err(|e| Error::io("listening on the control socket", e))?;
        epoll.add(listener.as_fd(), TOKEN_LISTENER).map_err(|e| Error::io("epoll_ctl", e))?;
        self.drop_role(epoll);
        tracing::info!(slot = self.slot, path = %self.path.display(), "elected broker");
        self.role = Role::Broker { listener, conns: Vec::new(), next_token: TOKEN_CONN_BASE };
        self.mode = mode;
        self.sock_epoch = epoch;
        self.sock_id = sys::random_u64() | 1;
        Ok(())
    }

    fn drop_role(&mut self, epoll: &Epoll) {
        match std::mem::replace(&mut self.role, Role::Detached) {
            Role::Detached => {}
            Role::Client { conn, .. } => {
                epoll.delete(conn.fd.as_fd());
                self.client_out.rewind();
            }
            Role::Broker { listener, conns, .. } => {
                epoll.delete(listener.as_fd());
                for c in conns {
                    epoll.delete(c.fd.as_fd());
                }
                for q in &mut self.slot_out {
                    q.rewind();
                }
            }
        }
    }

    /// Make progress: connect, read frames, accept and answer attaches. `hand_out` is what
    /// a broker gives attaching workers.
    ///
    /// `listener_ready`: epoll reported the listening socket readable. A broker also tries
    /// `accept` at least every [`ACCEPT_INTERVAL`] without it, so a busy-polling broker (which
    /// does not ask epoll every pass) spends no system call per pass on an empty backlog.
    pub(crate) fn poll(
        &mut self,
        now: Instant,
        epoll: &Epoll,
        hand_out: Option<&HandOut<'_>>,
        listener_ready: bool,
    ) -> Vec<CtlEvent> {
        let mut events = Vec::new();
        match &mut self.role {
            Role::Detached => {
                if now < self.next_retry {
                    return events;
                }
                self.next_retry = now + self.fo.next_backoff();
                match self.connect() {
                    Ok(conn) => {
                        if epoll.add(conn.fd.as_fd(), TOKEN_CLIENT).is_ok() {
                            self.role = Role::Client { conn, welcomed: false, fds: Vec::new() };
                            return self.poll(now, epoll, hand_out, listener_ready);
                        }
                    }
                    Err(e) => {
                        tracing::trace!(error = %e, "no broker yet");
                        let may_run = self.may_run(now);
                        if may_run && sys::try_lock_byte(self.lock.as_fd(), 0).unwrap_or(false) {
                            events.push(CtlEvent::Elected);
                        }
                    }
                }
            }
            Role::Client { conn, welcomed, fds } => {
                let state = conn.rd.fill(conn.fd.as_fd(), fds);
                let mut broken = !matches!(state, Ok(ReadState::Open));
                loop {
                    match conn.rd.next_frame() {
                        Ok(None) => break,
                        Ok(Some((kind::WELCOME, body))) if !*welcomed => {
                            match parse_welcome(body, std::mem::take(fds), self.geo.slots) {
                                Ok(ev) => {
                                    *welcomed = true;
                                    self.was_attached = true;
                                    if let CtlEvent::Welcome { shm, .. } = &ev {
                                        self.mode = if shm.is_some() { Mode::Shm } else { Mode::Socket };
                                    }
                                    self.fo.reset_backoff();
                                    events.push(ev);
                                }
                                Err(e) => {
                                    events.push(CtlEvent::Rejected(format!("bad WELCOME from the broker: {e}")));
                                    broken = true;
                                    break;
                                }
                            }
                        }
                        Ok(Some((kind::UNIQUE_ACK, body))) if *welcomed => match Body(body).u64() {
                            Ok(id) => events.push(CtlEvent::UniqueAck(id)),
                            Err(e) => {
                                tracing::warn!(error = %e, "bad UNIQUE_ACK from the broker; reconnecting");
                                broken = true;
                                break;
                            }
                        },
                        Ok(Some((k @ (kind::DELIVER | kind::LOST), body)))
                            if *welcomed && self.mode == Mode::Socket =>
                        {
                            self.inbox.push(u32::MAX, k, body);
                        }
                        Ok(Some((kind::REJECT, body))) if body.starts_with(failover::BUSY_PREFIX.as_bytes()) => {
                            tracing::debug!(reason = %String::from_utf8_lossy(body), "attach deferred; retrying");
                            self.next_retry = now + self.fo.next_backoff();
                            broken = true;
                            break;
                        }
                        Ok(Some((kind::REJECT, body))) => {
                            events.push(CtlEvent::Rejected(String::from_utf8_lossy(body).into_owned()));
                            self.next_retry = now + RETRY_AFTER_REJECT;
                            broken = true;
                            break;
                        }
                        Ok(Some((k, _))) => {
                            tracing::warn!(kind = k, "unexpected control frame from the broker; reconnecting");
                            broken = true;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control protocol error from the broker; reconnecting");
                            broken = true;
                            break;
                        }
                    }
                }
                if !broken {
                    let data = if *welcomed && self.mode == Mode::Socket { Some(&mut self.client_out) } else { None };
                    if let Err(e) = flush_conn(&mut conn.wr, data, conn.fd.as_fd()) {
                        tracing::debug!(error = %e, "write to broker failed");
                        broken = true;
                    }
                }
                if broken {
                    let was = *welcomed;
                    self.drop_role(epoll);
                    if was {
                        events.push(CtlEvent::BrokerLost);
                    }
                }
            }
            Role::Broker { listener, conns, next_token } => {
                let mut accept_due = listener_ready || now.duration_since(self.last_accept) >= ACCEPT_INTERVAL;
                if accept_due {
                    self.last_accept = now;
                }
                while accept_due {
                    match sys::accept(listener.as_fd()) {
                        Ok(Some(fd)) => {
                            let token = *next_token;
                            *next_token += 1;
                            if epoll.add(fd.as_fd(), token).is_err() {
                                continue;
                            }
                            let mut c = Conn {
                                fd,
                                rd: FrameReader::new(self.max_frame),
                                wr: FrameWriter::default(),
                                slot: None,
                                pid: 0,
                                closing: false,
                            };
                            match sys::peer_cred(c.fd.as_fd()) {
                                Ok((pid, uid)) if uid_ok(uid, &self.allowed_uids) => c.pid = pid,
                                Ok((pid, uid)) => {
                                    tracing::warn!(pid, uid, "refusing a control connection from a foreign user");
                                    reject(&mut c, &format!("uid {uid} is not allowed to attach"));
                                }
                                Err(e) => reject(&mut c, &format!("cannot read peer credentials: {e}")),
                            }
                            conns.push(c);
                        }
                        Ok(None) => accept_due = false,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            accept_due = false;
                        }
                    }
                }
                let attached: Vec<u32> = conns.iter().filter_map(|c| c.slot).collect();
                for c in conns.iter_mut() {
                    if c.closing {
                        continue;
                    }
                    let mut fds = Vec::new();
                    let state = c.rd.fill(c.fd.as_fd(), &mut fds);
                    drop(fds); // clients never pass descriptors; close any they send
                    if !matches!(state, Ok(ReadState::Open)) {
                        c.closing = true;
                        c.wr = FrameWriter::default();
                        continue;
                    }
                    loop {
                        match c.rd.next_frame() {
                            Ok(None) => break,
                            Ok(Some((kind::HELLO, body))) if c.slot.is_none() => {
                                match check_hello(body, &self.geo, self.slot, &attached) {
                                    Ok(slot) => match (self.mode, hand_out) {
                                        (Mode::Socket, _) => {
                                            welcome_socket(c, slot, self.slot, self.sock_epoch, self.sock_id);
                                            tracing::debug!(slot, pid = c.pid, "worker attached (socket transport)");
                                        }
                                        (_, Some(h)) => {
                                            welcome(c, slot, self.slot, h);
                                            tracing::debug!(slot, pid = c.pid, "worker attached");
                                        }
                                        (_, None) => reject(c, "broker has no region to hand out"),
                                    },
                                    Err(reason) => {
                                        tracing::warn!(pid = c.pid, %reason, "attach refused");
                                        reject(c, &reason);
                                    }
                                }
                            }
                            Ok(Some((kind::EVENT, body))) if c.slot.is_some() && self.mode == Mode::Socket => {
                                self.inbox.push(c.slot.expect("guarded"), kind::EVENT, body);
                            }
                            Ok(Some((kind::UNIQUE, body))) if c.slot.is_some() => match parse_unique(body) {
                                Ok((id, hash, msg)) => events.push(CtlEvent::Unique {
                                    slot: c.slot.expect("guarded"),
                                    id,
                                    hash: hash.to_vec(),
                                    msg: msg.to_vec(),
                                }),
                                Err(e) => {
                                    tracing::warn!(pid = c.pid, error = %e, "bad UNIQUE frame; closing");
                                    c.closing = true;
                                    break;
                                }
                            },
                            Ok(Some((k, _))) => {
                                tracing::warn!(pid = c.pid, kind = k, "unexpected control frame; closing");
                                c.closing = true;
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(pid = c.pid, error = %e, "control protocol error; closing");
                                c.closing = true;
                                c.wr = FrameWriter::default();
                                break;
                            }
                        }
                    }
                }
                let socket = self.mode == Mode::Socket;
                let slot_out = &mut self.slot_out;
                conns.retain_mut(|c| {
                    let data = match c.slot {
                        Some(s) if socket && !c.closing => slot_out.get_mut(s as usize),
                        _ => None,
                    };
                    let flushed = flush_conn(&mut c.wr, data, c.fd.as_fd());
                    let keep = match flushed {
                        Ok(done) => !(c.closing && done),
                        Err(_) => false,
                    };
                    if !keep {
                        epoll.delete(c.fd.as_fd());
                        if let Some(q) = c.slot.and_then(|s| slot_out.get_mut(s as usize)) {
                            // The frame this connection took in part goes whole to the next one.
                            q.rewind();
                        }
                    }
                    keep
                });
            }
        }
        events
    }

    fn connect(&mut self) -> io::Result<Conn> {
        let fd = sys::connect_unix(&self.path)?;
        let (_, uid) = sys::peer_cred(fd.as_fd())?;
        if !uid_ok(uid, &self.allowed_uids) {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("broker runs as foreign uid {uid}")));
        }
        let mut conn = Conn {
            fd,
            rd: FrameReader::new(self.max_frame),
            wr: FrameWriter::default(),
            slot: None,
            pid: 0,
            closing: false,
        };
        let g = &self.geo;
        conn.wr.frame(
            kind::HELLO,
            &[
                &PROTOCOL_VERSION.to_le_bytes(),
                &LAYOUT_VERSION.to_le_bytes(),
                &self.slot.to_le_bytes(),
                &sys::pid().to_le_bytes(),
                &g.workers.to_le_bytes(),
                &u32::from(g.agent).to_le_bytes(),
                &(g.ring_capacity as u32).to_le_bytes(),
            ],
        );
        conn.wr.flush(conn.fd.as_fd())?;
        Ok(conn)
    }
}

fn uid_ok(uid: u32, allowed: &[u32]) -> bool {
    uid == sys::euid() || allowed.contains(&uid)
}

/// Path of the lock file beside the socket.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

fn reject(c: &mut Conn, reason: &str) {
    c.wr.frame(kind::REJECT, &[reason.as_bytes()]);
    c.closing = true;
}

/// Queue `msg` for one destination, the owed lost notices first; false (and a notice owed)
/// when the destination's queue is full.
fn queue_deliver(q: &mut OutQueue, from: u32, stamp: &Stamp, msg: &[u8]) -> bool {
    q.push_lost_notices(kind::LOST);
    if q.push(kind::DELIVER, &[stamp, msg]) {
        true
    } else {
        q.note_lost(from);
        false
    }
}

/// WELCOME modes.
const WELCOME_SHM: u32 = 0;
const WELCOME_SOCKET: u32 = 1;

fn welcome_socket(c: &mut Conn, slot: u32, broker_slot: u32, epoch: u64, id: u64) {
    c.wr.frame(
        kind::WELCOME,
        &[
            &PROTOCOL_VERSION.to_le_bytes(),
            &WELCOME_SOCKET.to_le_bytes(),
            &broker_slot.to_le_bytes(),
            &epoch.to_le_bytes(),
            &id.to_le_bytes(),
            &0u32.to_le_bytes(),
        ],
    );
    c.slot = Some(slot);
}

fn welcome(c: &mut Conn, slot: u32, broker_slot: u32, h: &HandOut<'_>) {
    let mut fds = Vec::with_capacity(1 + h.eventfds.len());
    fds.push(h.region_fd);
    fds.extend_from_slice(&h.eventfds);
    c.wr.frame_with_fds(
        kind::WELCOME,
        &[
            &PROTOCOL_VERSION.to_le_bytes(),
            &WELCOME_SHM.to_le_bytes(),
            &broker_slot.to_le_bytes(),
            &h.epoch.to_le_bytes(),
            &h.region_id.to_le_bytes(),
            &(fds.len() as u32).to_le_bytes(),
        ],
        fds,
    );
    c.slot = Some(slot);
}

fn check_hello(body: &[u8], geo: &Geometry, broker_slot: u32, attached: &[u32]) -> std::result::Result<u32, String> {
    let mut b = Body(body);
    let proto = b.u32()?;
    if proto != PROTOCOL_VERSION {
        return Err(format!("control protocol version {proto}, the broker speaks {PROTOCOL_VERSION}"));
    }
    let layout = b.u32()?;
    if layout != LAYOUT_VERSION {
        return Err(format!("shared-memory layout version {layout}, the broker uses {LAYOUT_VERSION}"));
    }
    let slot = b.u32()?;
    let _pid = b.u32()?;
    let (workers, agent, ring) = (b.u32()?, b.u32()?, b.u32()?);
    if workers != geo.workers || (agent != 0) != geo.agent || ring as usize != geo.ring_capacity {
        return Err(format!(
            "options differ from the broker's: workers {workers}/{}, privileged agent {}/{}, ring_capacity {ring}/{}",
            geo.workers,
            agent != 0,
            geo.agent,
            geo.ring_capacity
        ));
    }
    if slot >= geo.slots {
        return Err(format!("slot {slot} out of range 0..{}", geo.slots));
    }
    if slot == broker_slot || attached.contains(&slot) {
        // A well-behaved client holds the slot's lock, so the other holder is dead and its
        // connection not yet seen closed: a transient refusal, the client retries.
        return Err(format!("{}slot {slot} is already attached by a live process", failover::BUSY_PREFIX));
    }
    Ok(slot)
}

fn parse_unique(body: &[u8]) -> std::result::Result<(u64, &[u8], &[u8]), String> {
    let mut b = Body(body);
    let id = b.u64()?;
    let len = b.u16()? as usize;
    if len == 0 || len > MAX_UNIQUE_HASH_LEN {
        return Err(format!("unique hash length {len} outside 1..={}", MAX_UNIQUE_HASH_LEN));
    }
    let hash = b.bytes(len)?;
    Ok((id, hash, b.0))
}

fn parse_welcome(body: &[u8], mut fds: Vec<OwnedFd>, slots: u32) -> std::result::Result<CtlEvent, String> {
    let mut b = Body(body);
    let proto = b.u32()?;
    if proto != PROTOCOL_VERSION {
        return Err(format!("protocol version {proto}"));
    }
    let mode = b.u32()?;
    let broker_slot = b.u32()?;
    let epoch = b.u64()?;
    let region_id = b.u64()?;
    let nfds = b.u32()?;
    if broker_slot >= slots {
        return Err(format!("broker slot {broker_slot} out of range 0..{slots}"));
    }
    match mode {
        WELCOME_SHM => {}
        WELCOME_SOCKET if nfds == 0 && fds.is_empty() => {
            return Ok(CtlEvent::Welcome { shm: None, broker_slot, epoch, broker_id: region_id });
        }
        WELCOME_SOCKET => return Err(format!("socket-mode WELCOME with {} descriptors", fds.len())),
        m => return Err(format!("unknown transport mode {m}")),
    }
    if nfds != 1 + slots || fds.len() != nfds as usize {
        return Err(format!("expected {} descriptors, frame says {nfds}, got {}", 1 + slots, fds.len()));
    }
    let eventfds = fds.split_off(1);
    for e in &eventfds {
        if !sys::EventFd::is_eventfd(e.as_fd()) {
            return Err(format!("descriptor {} is not an eventfd", e.as_raw_fd()));
        }
    }
    let region_fd = fds.pop().ok_or("missing region descriptor")?;
    Ok(CtlEvent::Welcome {
        shm: Some(ShmWelcome { region_fd, eventfds, region_id }),
        broker_slot,
        epoch,
        broker_id: region_id,
    })
}
