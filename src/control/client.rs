//! The client half of [`Control::poll`]: connect and send HELLO while detached, then read
//! the broker's frames (WELCOME, UNIQUE_ACK, REJECT, and the socket transport's data frames)
//! and write ours.

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::protocol::{self, BUSY_PREFIX, Flavor};
use super::{Conn, Control, CtlEvent, Role, TOKEN_CLIENT};
use crate::sys::{self, Epoll};
use crate::wire::frame::{ReadState, kind};
use crate::wire::queue::flush_conn;
use crate::wire::{DataPlane, Link, Peer};

/// Delay after the broker refused us.
const RETRY_AFTER_REJECT: Duration = Duration::from_secs(1);

/// What one frame from the broker means for the connection.
enum Next {
    Continue,
    /// Drop the connection (the reason is logged or reported already).
    Break,
}

impl Control {
    /// Detached: try to connect when due, or run for election. True when connected (the
    /// caller polls again as a client).
    pub(super) fn poll_detached(&mut self, now: Instant, epoll: &Epoll, events: &mut Vec<CtlEvent>) -> bool {
        if now < self.next_retry {
            return false;
        }
        self.next_retry = now + self.election.next_backoff();
        match self.connect() {
            Ok(conn) => {
                if epoll.add(conn.fd.as_fd(), TOKEN_CLIENT).is_ok() {
                    self.role = Role::Client { conn, welcomed: None, fds: Vec::new() };
                    return true;
                }
            }
            Err(e) => {
                tracing::trace!(error = %e, "no broker yet");
                if self.may_run(now) && self.lock.try_broker() {
                    self.took_broker_byte();
                    events.push(CtlEvent::Elected);
                }
            }
        }
        false
    }

    /// Connected to the broker: read and handle its frames, then write ours.
    pub(super) fn poll_client(
        &mut self,
        now: Instant,
        epoll: &Epoll,
        data: &mut dyn DataPlane,
        events: &mut Vec<CtlEvent>,
    ) {
        let Role::Client { conn, fds, welcomed } = &mut self.role else { return };
        // Descriptors ride only with the WELCOME: once welcomed, the read closes any the
        // broker passes, and fails (we reconnect).
        let want_fds = if welcomed.is_none() { Some(&mut *fds) } else { None };
        let state = conn.rd.fill(conn.fd.as_fd(), want_fds, usize::MAX);
        if let Err(e) = &state {
            tracing::warn!(error = %e, "reading from the broker failed; reconnecting");
        }
        // Every complete frame is handled, also those that came in the same read as the
        // broker's hang-up (a broker killed after writing them: acknowledgements, events
        // and notices for us); then we reconnect.
        let hung_up = !matches!(state, Ok(ReadState::Open));
        let mut broken = false;
        // A WELCOME carries the region, one eventfd per slot and the fan-out eventfd: more
        // is not a broker's.
        if fds.len() > 2 + self.geo.slots as usize {
            tracing::warn!(fds = fds.len(), "the broker passed more descriptors than a WELCOME carries; reconnecting");
            fds.clear();
            broken = true;
        }
        while !broken {
            let Role::Client { conn, welcomed, fds } = &mut self.role else { return };
            let frame = match conn.rd.next_frame() {
                Ok(None) => break,
                Ok(Some(f)) => f,
                Err(e) => {
                    tracing::warn!(error = %e, "control protocol error from the broker; reconnecting");
                    broken = true;
                    break;
                }
            };
            let (k, body) = frame;
            let next = match (k, *welcomed) {
                (kind::WELCOME, None) => match protocol::parse_welcome(body, std::mem::take(fds), self.geo.slots) {
                    Ok(w) => {
                        *welcomed = Some(if w.shm.is_some() { Flavor::Shm } else { Flavor::Socket });
                        self.was_attached = true;
                        self.election.reset_backoff();
                        events.push(CtlEvent::Welcome(w));
                        Next::Continue
                    }
                    Err(e) => {
                        events.push(CtlEvent::Rejected(format!("bad WELCOME from the broker: {e}")));
                        Next::Break
                    }
                },
                (kind::UNIQUE_ACK, Some(_)) => match protocol::parse_unique_ack(body) {
                    Ok(id) => {
                        events.push(CtlEvent::UniqueAck(id));
                        Next::Continue
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bad UNIQUE_ACK from the broker; reconnecting");
                        Next::Break
                    }
                },
                (kind::DIVERT, Some(_)) => match crate::divert::Patterns::decode(body) {
                    Ok(p) => {
                        self.divert_received(p, events);
                        Next::Continue
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bad DIVERT from the broker; reconnecting");
                        Next::Break
                    }
                },
                (kind::DELIVER | kind::LOST, Some(Flavor::Socket)) => {
                    data.receive(Link { peer: Peer::Broker, conn: conn.id }, k, body);
                    Next::Continue
                }
                (kind::REJECT, _) if body.starts_with(BUSY_PREFIX.as_bytes()) => {
                    tracing::debug!(reason = %String::from_utf8_lossy(body), "attach deferred; retrying");
                    self.next_retry = now + self.election.next_backoff();
                    Next::Break
                }
                (kind::REJECT, _) => {
                    events.push(CtlEvent::Rejected(String::from_utf8_lossy(body).into_owned()));
                    self.next_retry = now + RETRY_AFTER_REJECT;
                    Next::Break
                }
                (k, _) => {
                    tracing::warn!(kind = k, "unexpected control frame from the broker; reconnecting");
                    Next::Break
                }
            };
            broken = matches!(next, Next::Break);
        }
        broken |= hung_up;
        let Role::Client { conn, welcomed, .. } = &mut self.role else { return };
        if !broken && welcomed.is_none() && now >= conn.opened + super::HELLO_TIMEOUT {
            // The broker does not answer: it is stuck (a worker that takes the role over
            // renames a new socket over the path meanwhile), or slow. Reconnect.
            tracing::debug!("no answer to HELLO; reconnecting");
            broken = true;
        }
        if !broken {
            let link = Link { peer: Peer::Broker, conn: conn.id };
            let q = if *welcomed == Some(Flavor::Socket) { data.outbound(link) } else { None };
            if let Err(e) = flush_conn(&mut conn.wr, q, conn.fd.as_fd()) {
                tracing::debug!(error = %e, "write to broker failed");
                broken = true;
            }
        }
        if broken {
            let was = welcomed.is_some();
            self.drop_role(epoll);
            if was {
                events.push(CtlEvent::BrokerLost);
            }
        }
    }

    fn connect(&mut self) -> io::Result<Conn> {
        let fd = sys::connect_unix(&self.path)?;
        let (_, uid) = sys::peer_cred(fd.as_fd())?;
        if !uid_ok(uid, &self.allowed_uids) {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("broker runs as foreign uid {uid}")));
        }
        let mut conn = self.new_conn(fd);
        protocol::hello(&mut conn.wr, self.slot, &self.terms, (self.lock_id.dev, self.lock_id.ino));
        // The agent's diversion patterns ride right behind its HELLO (the broker forgets the
        // list at an agent's HELLO and takes this one).
        self.divert_after_hello(&mut conn);
        conn.wr.flush(conn.fd.as_fd())?;
        Ok(conn)
    }
}

/// May a peer running as `uid` take part (our own uid, or one the options allow)?
pub(super) fn uid_ok(uid: u32, allowed: &[u32]) -> bool {
    uid == sys::euid() || allowed.contains(&uid)
}
