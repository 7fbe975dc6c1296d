//! The data path of one worker as one enum (crossbeam-channel's `SenderFlavor` pattern):
//! in-process (testing mode), not attached yet, shared-memory rings ([`shm`]), or the
//! unix-socket fallback through the broker ([`socket`]). The worker facade asks the enum;
//! each transport answers in its own file. `transport` never imports `control` or `worker`:
//! it reaches the control connections through the `wire` traits.

pub(crate) mod shm;
pub(crate) mod socket;

use std::collections::VecDeque;

use rkyv::util::AlignedVec;

use crate::context::Room;
use crate::dedup::{Check, Tag};
use crate::event::Event;
use crate::message;
use crate::options::Transport;
use crate::wire::queue::{Inbox, OutQueue};
use crate::wire::{Connections, DataPlane, Link, Offer, Peer};
use shm::ShmPort;
use socket::SocketPort;

/// Messages taken from one ring per dispatch, so one busy peer cannot starve the others.
const RING_BUDGET: usize = 4096;

/// Where a transport hands what it received: the worker's callbacks and counters.
pub(crate) trait Deliver {
    /// Run the callbacks of a checked event.
    fn event(&mut self, ev: &Event<'_>);
    /// Run the callbacks of a checked message whose names are not validated as UTF-8 yet;
    /// false (nothing ran) when a name is not UTF-8. The default validates, then calls
    /// [`Deliver::event`]; the worker's sink skips the validation for names it has seen.
    fn raw_event(&mut self, m: &message::Raw<'_>) -> bool {
        let (Ok(source), Ok(event)) = (std::str::from_utf8(m.source()), std::str::from_utf8(m.event())) else {
            return false;
        };
        self.event(&Event { source, event, data: m.data, wid: m.wid, ext: m.ext });
        true
    }
    /// `count` events of publisher slot `from` never reached this worker (a lost notice).
    fn lost(&mut self, from: u32, count: u64);
    /// A malformed or repeated message was dropped.
    fn dropped(&mut self);
}

/// Counters a port keeps; the worker folds them into its `Stats`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PortCounters {
    /// Receivers woken (claimed `parked` flags).
    pub wakeups_sent: u64,
    /// Eventfd writes those wake-ups took (one per receiver, or one fan-out write for
    /// several: `transport/shm/write.rs`).
    pub wake_writes: u64,
    pub lost_outbound: u64,
    pub dropped: u64,
    /// Inbound rings found corrupt (reported once per episode) or resynchronized at attach.
    pub corrupt_rings: u64,
    /// (socket broker) Copies of unique events written to a receiver dropped past their
    /// bound before it acknowledged them (`wire/unacked.rs`).
    pub unique_unguarded: u64,
    /// (per-publisher topology) Receivers diverted from our broadcast ring to their pair
    /// ring (`transport/shm/bcast.rs`).
    pub diverts: u64,
    /// (per-publisher topology) Diverted receivers told to resume the broadcast ring.
    pub resumes: u64,
}

/// Queue depths towards and from one peer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerDepth {
    pub peer: Peer,
    /// Events queued for it (ring plus backlog, or socket queue).
    pub outbound: u64,
    /// Of which in a private backlog (shared memory).
    pub backlog: u64,
    /// Events from it waiting in our inbound ring.
    pub inbound: u64,
}

/// What a flush or a drain pass achieved.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Drained {
    /// Events dispatched.
    pub events: usize,
    /// More is waiting (a ring budget ran out).
    pub more: bool,
}

/// "all" events published before this worker attached, and data frames that arrived with
/// the WELCOME before the transport existed.
#[derive(Default)]
pub(crate) struct PreAttach {
    events: VecDeque<AlignedVec>,
    inbox: Inbox,
}

/// Where [`DataPath::send_to`] put a unique event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// In the target's ring (or its backlog at the publisher, shared memory): nothing more
    /// to follow.
    Written,
    /// (socket transport) In the broker's queue for the target: handed off once the
    /// kernel took it ([`SocketPort::handed_off`] with this ticket).
    Queued(u64),
    /// (socket transport) The target's queue is full: nothing sent.
    Full,
}

/// The data path.
pub(crate) enum DataPath {
    /// Testing mode: events run synchronously in the publishing process, nothing is opened.
    InProcess,
    /// No broker yet: "all" events wait here (bounded by `max_queue_len`).
    Unattached(PreAttach),
    /// Rings in the shared region.
    Shm(ShmPort),
    /// Every event rides the control connections, through the broker.
    Socket(SocketPort),
}

impl DataPath {
    /// The transport in use; `None` while not decided (not attached yet, or in-process).
    pub(crate) fn transport(&self) -> Option<Transport> {
        match self {
            DataPath::InProcess | DataPath::Unattached(_) => None,
            DataPath::Shm(_) => Some(Transport::SharedMemory),
            DataPath::Socket(_) => Some(Transport::Socket),
        }
    }

    /// Testing mode.
    pub(crate) fn is_in_process(&self) -> bool {
        matches!(self, DataPath::InProcess)
    }

    /// Without rings the sockets are the data path: the worker reads them on every pass.
    pub(crate) fn reads_sockets_every_pass(&self) -> bool {
        !matches!(self, DataPath::Shm(_))
    }

    /// The shared-memory port, if that is the data path.
    pub(crate) fn shm(&self) -> Option<&ShmPort> {
        match self {
            DataPath::Shm(p) => Some(p),
            _ => None,
        }
    }

    /// The socket port, if that is the data path.
    pub(crate) fn socket_mut(&mut self) -> Option<&mut SocketPort> {
        match self {
            DataPath::Socket(p) => Some(p),
            _ => None,
        }
    }

    /// Room for one more "all" event (`cap`: `max_queue_len`).
    pub(crate) fn has_room(&self, cap: usize) -> bool {
        match self {
            DataPath::InProcess | DataPath::Shm(_) => true,
            DataPath::Unattached(pre) => pre.events.len() < cap,
            DataPath::Socket(p) => p.has_room(),
        }
    }

    /// [`DataPath::has_room`] for several events in a row (publishes from callbacks,
    /// checked while the data path is busy delivering).
    pub(crate) fn all_room(&self, cap: usize) -> Room {
        match self {
            DataPath::InProcess | DataPath::Shm(_) => Room::UNLIMITED,
            DataPath::Unattached(pre) => Room::frames(cap.saturating_sub(pre.events.len())),
            DataPath::Socket(p) => p.all_room(),
        }
    }

    /// Send an "all" event to every other slot (after [`DataPath::has_room`]).
    pub(crate) fn send_all(&mut self, msg: &AlignedVec, conns: Option<&mut (dyn Connections + '_)>) {
        match self {
            DataPath::InProcess => {}
            DataPath::Unattached(pre) => pre.events.push_back(msg.clone()),
            DataPath::Shm(port) => {
                port.flush();
                port.send_all(msg);
            }
            DataPath::Socket(p) => {
                p.send_all(msg, conns);
            }
        }
    }

    /// Around a [`crate::Batch`]'s publish: leave what it writes uncommitted (shared
    /// memory; the other data paths send as usual).
    pub(crate) fn set_defer(&mut self, on: bool) {
        if let DataPath::Shm(port) = self {
            port.set_defer(on);
        }
    }

    /// A [`crate::Batch`]'s end: commit what it left uncommitted and wake parked receivers.
    pub(crate) fn end_batch(&mut self) {
        if let DataPath::Shm(port) = self {
            port.end_batch();
        }
    }

    /// (broker) Send a unique event to slot `to`: see [`Sent`].
    pub(crate) fn send_to(&mut self, to: u32, msg: &AlignedVec) -> Sent {
        match self {
            DataPath::InProcess | DataPath::Unattached(_) => Sent::Written,
            DataPath::Shm(port) => {
                port.send_to(to, msg);
                Sent::Written
            }
            DataPath::Socket(p) => p.send_to(to, msg).map_or(Sent::Full, Sent::Queued),
        }
    }

    /// The socket port, if that is the data path.
    pub(crate) fn socket(&self) -> Option<&SocketPort> {
        match self {
            DataPath::Socket(p) => Some(p),
            _ => None,
        }
    }

    /// (broker) The dedup table is available.
    pub(crate) fn can_dedup(&self) -> bool {
        match self {
            DataPath::InProcess | DataPath::Unattached(_) => false,
            DataPath::Shm(_) => true,
            DataPath::Socket(p) => p.can_dedup(),
        }
    }

    /// (shared memory) The region's dedup tag of a unique hash, with its home line of the
    /// table prefetched ([`DedupTable::prefetch`](crate::dedup::DedupTable::prefetch));
    /// `None` on the other paths (no shared table).
    pub(crate) fn dedup_prefetch(&self, hash: &[u8]) -> Option<Tag> {
        let DataPath::Shm(port) = self else { return None };
        let r = port.region();
        let tag = crate::dedup::tag(r.sip_key(), hash);
        r.dedup().prefetch(tag);
        Some(tag)
    }

    /// (broker) Look a unique hash up in the dedup table (the region's, or the socket
    /// broker's private one) and record it; `None` without a table. `tag`: the hash's
    /// region tag from [`DataPath::dedup_prefetch`] on this path, if taken already (the same
    /// function of the same key; not re-checked: the key word is shared memory, which a
    /// hostile peer may rewrite between the two reads, and a debug check would then panic).
    pub(crate) fn dedup_check(&self, hash: &[u8], tag: Option<Tag>, now_ns: u64, ttl_ns: u64) -> Option<Check> {
        match self {
            DataPath::InProcess | DataPath::Unattached(_) => None,
            DataPath::Shm(port) => {
                let r = port.region();
                let tag = tag.unwrap_or_else(|| crate::dedup::tag(r.sip_key(), hash));
                Some(r.dedup().check_and_record(tag, now_ns, ttl_ns))
            }
            DataPath::Socket(p) => p.dedup_check(hash, now_ns, ttl_ns),
        }
    }

    /// Dispatch what arrived into `sink`: rings (after retrying backlogs) or socket frames
    /// (the caller writes the sockets after it, with what the callbacks published: see
    /// `worker/poll.rs`).
    pub(crate) fn drain<D: Deliver>(&mut self, sink: &mut D) -> Drained {
        match self {
            DataPath::InProcess | DataPath::Unattached(_) => Drained::default(),
            DataPath::Shm(port) => {
                let (events, more) = port.dispatch(RING_BUDGET, sink);
                Drained { events, more }
            }
            DataPath::Socket(p) => Drained { events: p.dispatch(sink), more: false },
        }
    }

    /// Retry what waits for room and write what the sockets take; true when nothing of the
    /// data path is left queued (the pre-attach queue counts).
    pub(crate) fn flush(&mut self, conns: Option<&mut (dyn Connections + '_)>) -> bool {
        match self {
            DataPath::InProcess => true,
            DataPath::Unattached(pre) => pre.events.is_empty(),
            DataPath::Shm(port) => {
                port.flush();
                port.backlogged() == 0
            }
            DataPath::Socket(p) => conns.is_none_or(|c| p.flush(c)),
        }
    }

    /// Data frames a connected link has not written yet (socket transport).
    pub(crate) fn has_output(&self, conns: &dyn Connections) -> bool {
        match self {
            DataPath::Socket(p) => p.has_output(conns),
            _ => false,
        }
    }

    /// Clear the parked flag; true when a publisher cleared it first and wrote our eventfd
    /// (shared memory): an edge the caller harvests unless its `epoll_wait` saw it.
    pub(crate) fn disarm(&mut self) -> bool {
        match self {
            DataPath::Shm(port) => port.disarm(),
            _ => false,
        }
    }

    /// Arm the wake-up before sleeping; false when work arrived meanwhile (do not sleep).
    /// Only the rings need arming: the sockets wake epoll by themselves.
    pub(crate) fn arm(&mut self) -> bool {
        match self {
            DataPath::Shm(port) => port.arm(),
            _ => true,
        }
    }

    /// Whether an inbound ring has a record waiting (shared memory; false otherwise).
    pub(crate) fn has_inbound(&mut self) -> bool {
        match self {
            DataPath::Shm(port) => port.has_inbound(),
            _ => false,
        }
    }

    /// Take the hint that our control sockets have something (shared memory).
    pub(crate) fn take_control_hint(&self, me: u32) -> bool {
        self.shm().is_some_and(|p| p.region().take_control_hint(me))
    }

    /// Tell a busy-polling `slot` to look at its control sockets now (shared memory).
    pub(crate) fn set_control_hint(&self, slot: u32) {
        if let Some(p) = self.shm() {
            p.region().set_control_hint(slot);
        }
    }

    /// What the control channel needs for one poll: what a broker offers attaching
    /// workers (`serving`: we are the broker; `epoch`: its epoch), and where data frames go
    /// (`None` on shared memory, which carries no data on the sockets).
    pub(crate) fn control_view(&mut self, serving: bool, epoch: u64) -> (Offer<'_>, Option<&mut dyn DataPlane>) {
        match self {
            DataPath::InProcess => (Offer::Nothing, None),
            DataPath::Unattached(pre) => (Offer::Nothing, Some(pre)),
            DataPath::Shm(port) => (if serving { port.offer(epoch) } else { Offer::Nothing }, None),
            DataPath::Socket(p) => {
                let offer = if serving { Offer::Socket { epoch, broker_id: p.broker_id() } } else { Offer::Nothing };
                (offer, Some(p))
            }
        }
    }

    /// Outbound events still to hand over: ring backlogs for peers `alive` says are live,
    /// events queued for the broker, events published before attaching.
    pub(crate) fn unflushed(&self, alive: impl Fn(u32) -> bool) -> u64 {
        match self {
            DataPath::InProcess => 0,
            DataPath::Unattached(pre) => pre.events.len() as u64,
            DataPath::Shm(port) => port
                .depths()
                .filter(|d| d.backlog > 0 && matches!(d.peer, Peer::Slot(s) if alive(s)))
                .map(|d| d.backlog)
                .sum(),
            DataPath::Socket(p) => p.unsent(),
        }
    }

    /// Queue depths per peer.
    pub(crate) fn depths(&self) -> Vec<PeerDepth> {
        match self {
            DataPath::InProcess | DataPath::Unattached(_) => Vec::new(),
            DataPath::Shm(port) => port.depths().collect(),
            DataPath::Socket(p) => p.depths(),
        }
    }

    /// The port's counters (zero without a port).
    pub(crate) fn counters(&self) -> PortCounters {
        match self {
            DataPath::Shm(port) => port.counters,
            DataPath::Socket(p) => PortCounters { unique_unguarded: p.unguarded(), ..p.counters },
            _ => PortCounters::default(),
        }
    }

    /// Give up every ring backlog (closing); they are counted lost in the rings.
    pub(crate) fn abandon_backlogs(&mut self) {
        if let DataPath::Shm(port) = self {
            port.abandon_backlogs();
        }
    }

    /// Leave this path for `next`, handing the events still waiting to it: pre-attach
    /// events, or the socket queue's unsent events on a move to shared memory. Returns the
    /// old path (its counters are still to fold) and the events that did not fit.
    pub(crate) fn switch_to(
        &mut self,
        next: DataPath,
        mut conns: Option<&mut (dyn Connections + '_)>,
    ) -> (DataPath, u64) {
        let mut old = std::mem::replace(self, next);
        let (waiting, inbox) = match old {
            DataPath::Unattached(ref mut pre) => {
                (std::mem::take(&mut pre.events).into_iter().collect(), std::mem::take(&mut pre.inbox))
            }
            DataPath::Socket(ref mut p) if matches!(self, DataPath::Shm(_)) => (p.take_unsent(), Inbox::default()),
            _ => (Vec::new(), Inbox::default()),
        };
        let mut overflows = 0;
        match self {
            DataPath::Shm(port) => waiting.iter().for_each(|m| port.send_all(m)),
            DataPath::Socket(p) => {
                p.adopt_inbox(inbox);
                for m in &waiting {
                    if !p.send_all(m, conns.as_deref_mut()) {
                        overflows += 1;
                    }
                }
            }
            _ => {}
        }
        (old, overflows)
    }
}

impl DataPlane for PreAttach {
    fn receive(&mut self, from: Link, kind: u8, body: &[u8]) {
        self.inbox.push(from, kind, body);
    }

    fn outbound(&mut self, _link: Link) -> Option<&mut OutQueue> {
        None
    }
}
