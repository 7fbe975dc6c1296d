//! How the privileged agent's unique-diversion patterns travel (see ARCHITECTURE.md §R):
//! the agent sends them in a DIVERT frame right after its HELLO (and again whenever it
//! changes them); the broker keeps the current list, pushes it to every attached worker
//! when it changes and to each worker it welcomes, and hands it to its own worker. The list
//! outlives the agent's connection (while the agent is away, publishers see it is not
//! attached and route matching events themselves, counting them); it is replaced when an
//! agent says HELLO (a new agent process has no list until it sends one; an agent that
//! re-attaches sends its own right behind its HELLO, so the broker usually reads both in one
//! poll and nothing changes for the workers). Every worker keeps the last list it received,
//! so a worker elected broker after a failover starts with the list the agent last gave.

use super::protocol;
use super::{Conn, Control, CtlEvent, Role};
use crate::divert::Patterns;

/// The diversion state of one control channel.
#[derive(Debug, Default)]
pub(super) struct DivertState {
    /// The current list: as the broker, the one it serves; as a client, the last one the
    /// broker pushed.
    pub(super) current: Patterns,
    /// (broker) The list last pushed to the workers (and reported to our own worker).
    pushed: Patterns,
    /// (agent) Our own list, sent after every HELLO.
    own: Option<Patterns>,
}

/// What one broker poll learned about the list from the frames it read.
#[derive(Debug, Default)]
pub(super) struct DivertUpdate {
    /// The list as the frames left it (a HELLO of the agent resets it to empty).
    pub(super) list: Option<Patterns>,
}

impl Control {
    /// (agent) Set our diversion patterns: sent to the broker now (or after the next HELLO),
    /// served at once when we are the broker.
    pub(crate) fn set_divert(&mut self, patterns: Patterns) {
        match &mut self.role {
            Role::Broker { .. } => self.divert.current = patterns.clone(),
            Role::Client { conn, .. } => protocol::divert(&mut conn.wr, &patterns),
            Role::Detached => {}
        }
        self.divert.own = Some(patterns);
    }

    /// (agent) Queue our list after the HELLO on a new connection.
    pub(super) fn divert_after_hello(&self, conn: &mut Conn) {
        if let Some(p) = &self.divert.own {
            protocol::divert(&mut conn.wr, p);
        }
    }

    /// (client) The broker pushed a list.
    pub(super) fn divert_received(&mut self, patterns: Patterns, events: &mut Vec<CtlEvent>) {
        self.divert.current = patterns.clone();
        events.push(CtlEvent::Divert(patterns));
    }

    /// Becoming the broker: serve the agent's own list if we are the agent, else the last
    /// one pushed to us; the first poll pushes it to every worker and to our own.
    pub(super) fn divert_serving(&mut self) {
        if let Some(own) = &self.divert.own {
            self.divert.current = own.clone();
        }
        self.divert.pushed = Patterns::default();
    }

    /// (broker) After a poll: apply what the frames said, and push a changed list to every
    /// attached worker and our own.
    pub(super) fn divert_after_poll(&mut self, update: DivertUpdate, events: &mut Vec<CtlEvent>) {
        if let Some(list) = update.list {
            self.divert.current = list;
        }
        let Role::Broker { conns, .. } = &mut self.role else { return };
        if self.divert.current == self.divert.pushed {
            return;
        }
        for c in conns.iter_mut().filter(|c| c.slot.is_some() && !c.closing) {
            protocol::divert(&mut c.wr, &self.divert.current);
        }
        self.divert.pushed = self.divert.current.clone();
        events.push(CtlEvent::Divert(self.divert.current.clone()));
    }
}
