//! The broker half of [`Control::poll`]: accept connections (checking the peer's uid), read
//! each worker's frames (HELLO, UNIQUE, and the socket transport's EVENT frames), answer
//! attaches, and write every connection's frames.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::client::uid_ok;
use super::divert::DivertUpdate;
use super::inspect::{self, AttachedSlot};
use super::protocol::{self, Flavor};
use super::{Conn, Control, CtlEvent, Role};
use crate::options::AttachTerms;
use crate::sys::{self, Epoll};
use crate::wire::frame::{FrameWriter, ReadState, kind};
use crate::wire::queue::flush_conn;
use crate::wire::{DataPlane, Link, Offer, Peer};

/// Longest time a broker goes without trying `accept` (see [`Control::poll`]).
const ACCEPT_INTERVAL: Duration = Duration::from_millis(1);
/// A connection that has not been welcomed this long after it was accepted is closed (a
/// worker sends its HELLO as soon as it connects).
pub(crate) const ATTACH_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections not attached (yet) beyond which a new one must bring a complete HELLO in its
/// first read, or is closed at once: a flood of idle connections cannot keep workers out.
pub(crate) const MAX_UNATTACHED: usize = 64;
/// Frame length limit of a connection until it is welcomed (a HELLO is under 100 bytes).
pub(crate) const HELLO_MAX_FRAME: usize = 1024;

impl Control {
    /// Serving: accept, read, answer, write.
    pub(super) fn poll_broker(
        &mut self,
        now: Instant,
        epoll: &Epoll,
        offer: &Offer<'_>,
        listener_ready: bool,
        data: &mut dyn DataPlane,
        events: &mut Vec<CtlEvent>,
    ) {
        let accept_due = listener_ready || now.duration_since(self.last_accept) >= ACCEPT_INTERVAL;
        if accept_due {
            self.last_accept = now;
            self.accept_pending(epoll);
        }
        let Role::Broker { conns, .. } = &mut self.role else { return };
        // Slots attached, including those welcomed in this poll: a second HELLO for one slot
        // is refused (busy) even when both arrive in the same poll.
        let mut attached: Vec<u32> = conns.iter().filter_map(|c| c.slot).collect();
        let lock = (self.lock_id.dev, self.lock_id.ino);
        let agent = self.geo.agent.then_some(self.geo.workers);
        let divert = &self.divert.current;
        let hello = Hello { terms: &self.terms, lock, me: self.slot, offer, max_frame: self.max_frame, agent, divert };
        let mut update = DivertUpdate::default();
        let connected: Vec<u32> = conns.iter().filter(|c| !c.closing).filter_map(|c| c.slot).collect();
        data.links_seen(&connected, now);
        // Connections that sent INSPECT (answered after the loop, with every slot's pid).
        let mut inspectors: Vec<u64> = Vec::new();
        for c in conns.iter_mut().filter(|c| !c.closing) {
            if c.slot.is_none() && now.duration_since(c.opened) >= ATTACH_TIMEOUT {
                tracing::warn!(pid = c.pid, "no HELLO within {ATTACH_TIMEOUT:?}; closing the connection");
                c.closing = true;
                c.wr = FrameWriter::default();
                continue;
            }
            // Flow control: a publisher is read only as far as its destinations have room.
            let budget = c.slot.map_or(usize::MAX, |s| data.read_budget(s));
            if budget == 0 {
                if !c.held {
                    // Out of the epoll set while held back, or a level-triggered wait
                    // would return at once on its unread bytes.
                    epoll.delete(c.fd.as_fd());
                    c.held = true;
                }
                continue;
            }
            if c.held {
                c.held = epoll.add(c.fd.as_fd(), c.token).is_err();
            }
            // Clients never pass descriptors: the read closes any they send, and fails.
            let state = c.rd.fill(c.fd.as_fd(), None, budget);
            // Every complete frame is handled, also those that arrived in the same read as
            // the peer's hang-up or an error (a publisher that exits right after a burst).
            if read_frames(c, &hello, &mut attached, data, events, &mut update) {
                inspectors.push(c.id);
            }
            if let Err(e) = &state {
                tracing::warn!(pid = c.pid, error = %e, "control connection read failed; closing");
            }
            if !matches!(state, Ok(ReadState::Open)) || (c.probation && c.slot.is_none()) {
                // A hang-up, an error, or a connection over the cap without its HELLO.
                c.closing = true;
                c.wr = FrameWriter::default();
            }
            c.probation = false;
        }
        if !inspectors.is_empty() {
            answer_inspectors(conns, &inspectors, &hello, data);
        }
        conns.retain_mut(|c| {
            let q = match c.slot {
                Some(s) if !c.closing => data.outbound(Link { peer: Peer::Slot(s), conn: c.id }),
                _ => None,
            };
            let keep = match flush_conn(&mut c.wr, q, c.fd.as_fd()) {
                Ok(done) => !(c.closing && done),
                Err(_) => false,
            };
            if !keep {
                // The data queue of its slot rewinds when the next connection writes to it.
                epoll.delete(c.fd.as_fd());
            }
            keep
        });
        self.divert_after_poll(update, events);
    }

    /// Accept every pending connection; a peer of a foreign uid gets a REJECT.
    fn accept_pending(&mut self, epoll: &Epoll) {
        loop {
            let Role::Broker { listener, .. } = &self.role else { return };
            let fd = match sys::accept(listener.as_fd()) {
                Ok(Some(fd)) => fd,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            };
            let Role::Broker { next_token, conns, .. } = &mut self.role else { return };
            let token = *next_token;
            *next_token += 1;
            let unattached = conns.iter().filter(|c| c.slot.is_none() && !c.closing).count();
            if epoll.add(fd.as_fd(), token).is_err() {
                continue;
            }
            let mut c = self.new_conn(fd);
            c.token = token;
            c.rd.set_max_frame(HELLO_MAX_FRAME);
            if unattached >= MAX_UNATTACHED {
                tracing::warn!(unattached, "too many connections not attached; this one must attach at once");
                c.probation = true;
            }
            match sys::peer_cred(c.fd.as_fd()) {
                Ok((pid, uid)) if uid_ok(uid, &self.allowed_uids) => c.pid = pid,
                Ok((pid, uid)) => {
                    tracing::warn!(pid, uid, "refusing a control connection from a foreign user");
                    reject(&mut c, &format!("uid {uid} is not allowed to attach"));
                }
                Err(e) => reject(&mut c, &format!("cannot read peer credentials: {e}")),
            }
            if let Role::Broker { conns, .. } = &mut self.role {
                conns.push(c);
            }
        }
    }
}

/// What the broker answers a HELLO with: its options, its slot, its offer.
struct Hello<'a, 'b> {
    terms: &'a AttachTerms,
    lock: protocol::LockId,
    me: u32,
    offer: &'a Offer<'b>,
    /// Frame length limit once welcomed.
    max_frame: usize,
    /// The agent's slot, if the deployment has one.
    agent: Option<u32>,
    /// The unique-diversion patterns served now (each welcomed worker gets them).
    divert: &'a crate::divert::Patterns,
}

/// Answer every connection in `ids` (each sent INSPECT) with the broker's view, then close it.
fn answer_inspectors(conns: &mut [Conn], ids: &[u64], h: &Hello<'_, '_>, data: &mut dyn DataPlane) {
    let pids: Vec<AttachedSlot> = conns
        .iter()
        .filter(|c| !c.closing)
        .filter_map(|c| {
            let slot = c.slot?;
            let queued = data
                .outbound(Link { peer: Peer::Slot(slot), conn: c.id })
                .map(|q| (q.len() as u64, q.queued_bytes() as u64));
            Some(AttachedSlot { slot, pid: c.pid.max(0) as u32, queued })
        })
        .collect();
    for c in conns.iter_mut().filter(|c| ids.contains(&c.id) && !c.closing) {
        if inspect::reply(&mut c.wr, h.me, h.terms, h.offer, &pids) {
            tracing::debug!(pid = c.pid, "inspector served");
            c.closing = true;
        } else {
            reject(c, "broker has no data path to inspect yet");
        }
    }
}

/// Handle every complete frame a worker sent; `attached` gains the slot of a worker welcomed
/// here. True when an inspector asked for a snapshot (answered by the caller).
fn read_frames(
    c: &mut Conn,
    h: &Hello<'_, '_>,
    attached: &mut Vec<u32>,
    data: &mut dyn DataPlane,
    events: &mut Vec<CtlEvent>,
    divert: &mut DivertUpdate,
) -> bool {
    let flavor = Flavor::of(h.offer);
    let socket = flavor == Some(Flavor::Socket);
    loop {
        match c.rd.next_frame() {
            Ok(None) => break,
            Ok(Some((kind::HELLO, body))) if c.slot.is_none() => {
                match protocol::check_hello(body, h.terms, h.lock, flavor, h.me, attached) {
                    Ok(slot) => {
                        if protocol::welcome(&mut c.wr, h.me, h.offer) {
                            if h.agent == Some(slot) {
                                // A (new) agent starts with no diversion until it says so
                                // (its DIVERT follows its HELLO).
                                divert.list = Some(crate::divert::Patterns::default());
                            } else if !h.divert.is_empty() {
                                protocol::divert(&mut c.wr, h.divert);
                            }
                            c.slot = Some(slot);
                            data.welcomed(Link { peer: Peer::Slot(slot), conn: c.id }, c.pid);
                            c.rd.set_max_frame(h.max_frame);
                            attached.push(slot);
                            tracing::debug!(slot, pid = c.pid, socket, "worker attached");
                        } else {
                            reject(c, "broker has no region to hand out");
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(pid = c.pid, %reason, "attach refused");
                        reject(c, &reason);
                    }
                }
            }
            Ok(Some((kind::EVENT, body))) if socket && c.slot.is_some() => {
                data.receive(Link { peer: Peer::Slot(c.slot.expect("guarded")), conn: c.id }, kind::EVENT, body);
            }
            Ok(Some((kind::ACK, body))) if socket && c.slot.is_some() => match protocol::parse_ack(body) {
                Ok(total) => data.ack(Link { peer: Peer::Slot(c.slot.expect("guarded")), conn: c.id }, total),
                Err(e) => {
                    tracing::warn!(pid = c.pid, error = %e, "bad ACK frame; closing");
                    c.closing = true;
                    break;
                }
            },
            Ok(Some((kind::UNIQUE, body))) if c.slot.is_some() => match protocol::parse_unique(body) {
                Ok(u) => events.push(CtlEvent::Unique {
                    slot: c.slot.expect("guarded"),
                    conn: c.id,
                    id: u.id,
                    hash: u.hash.to_vec(),
                    msg: u.msg.to_vec(),
                }),
                Err(e) => {
                    tracing::warn!(pid = c.pid, error = %e, "bad UNIQUE frame; closing");
                    c.closing = true;
                    break;
                }
            },
            Ok(Some((kind::DIVERT, body))) if c.slot.is_some() && c.slot == h.agent => {
                match crate::divert::Patterns::decode(body) {
                    Ok(p) => divert.list = Some(p),
                    Err(e) => {
                        tracing::warn!(pid = c.pid, error = %e, "bad DIVERT frame from the agent; closing");
                        c.closing = true;
                        break;
                    }
                }
            }
            Ok(Some((kind::INSPECT, body))) if c.slot.is_none() => {
                match inspect::check_request(body) {
                    Ok(()) => return true,
                    Err(reason) => reject(c, &reason),
                }
                break;
            }
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
    false
}

fn reject(c: &mut Conn, reason: &str) {
    protocol::reject(&mut c.wr, reason);
    c.closing = true;
}

/// Write control frames and data frames (owed lost notices first) of every open connection.
pub(super) fn write_conns(conns: &mut [Conn], data: &mut dyn DataPlane) {
    for c in conns.iter_mut().filter(|c| !c.closing) {
        let q = c.slot.and_then(|s| data.outbound(Link { peer: Peer::Slot(s), conn: c.id }));
        if let Some(q) = q {
            q.push_lost_notices(kind::LOST);
            if let Err(e) = flush_conn(&mut c.wr, Some(q), c.fd.as_fd()) {
                tracing::debug!(error = %e, slot = c.slot, "write to a worker failed");
            }
        } else if let Err(e) = c.wr.flush(c.fd.as_fd()) {
            tracing::debug!(error = %e, "write to a worker failed");
        }
    }
}
