//! The broker half of [`Control::poll`]: accept connections (checking the peer's uid), read
//! each worker's frames (HELLO, UNIQUE, and the socket transport's EVENT frames), answer
//! attaches, and write every connection's frames.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::client::uid_ok;
use super::protocol::{self, Flavor};
use super::{Conn, Control, CtlEvent, Role};
use crate::options::AttachTerms;
use crate::sys::{self, Epoll};
use crate::wire::frame::{FrameWriter, ReadState, kind};
use crate::wire::queue::flush_conn;
use crate::wire::{DataPlane, Link, Offer, Peer};

/// Longest time a broker goes without trying `accept` (see [`Control::poll`]).
const ACCEPT_INTERVAL: Duration = Duration::from_millis(1);

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
        let hello = Hello { terms: &self.terms, lock, me: self.slot, offer };
        for c in conns.iter_mut().filter(|c| !c.closing) {
            let mut fds = Vec::new();
            let state = c.rd.fill(c.fd.as_fd(), &mut fds);
            drop(fds); // clients never pass descriptors; close any they send
            // Every complete frame is handled, also those that arrived in the same read as
            // the peer's hang-up or an error (a publisher that exits right after a burst).
            read_frames(c, &hello, &mut attached, data, events);
            if !matches!(state, Ok(ReadState::Open)) {
                c.closing = true;
                c.wr = FrameWriter::default();
            }
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
            let Role::Broker { next_token, .. } = &mut self.role else { return };
            let token = *next_token;
            *next_token += 1;
            if epoll.add(fd.as_fd(), token).is_err() {
                continue;
            }
            let mut c = self.new_conn(fd);
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
}

/// Handle every complete frame a worker sent; `attached` gains the slot of a worker welcomed
/// here.
fn read_frames(
    c: &mut Conn,
    h: &Hello<'_, '_>,
    attached: &mut Vec<u32>,
    data: &mut dyn DataPlane,
    events: &mut Vec<CtlEvent>,
) {
    let flavor = Flavor::of(h.offer);
    let socket = flavor == Some(Flavor::Socket);
    loop {
        match c.rd.next_frame() {
            Ok(None) => break,
            Ok(Some((kind::HELLO, body))) if c.slot.is_none() => {
                match protocol::check_hello(body, h.terms, h.lock, flavor, h.me, attached) {
                    Ok(slot) => {
                        if protocol::welcome(&mut c.wr, h.me, h.offer) {
                            c.slot = Some(slot);
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
                data.receive(Peer::Slot(c.slot.expect("guarded")), kind::EVENT, body);
            }
            Ok(Some((kind::UNIQUE, body))) if c.slot.is_some() => match protocol::parse_unique(body) {
                Ok(u) => events.push(CtlEvent::Unique {
                    slot: c.slot.expect("guarded"),
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
