//! The attach protocol's frames: HELLO (client -> broker), WELCOME and REJECT (broker ->
//! client), UNIQUE and UNIQUE_ACK, each built and parsed here. Every parse treats the bytes
//! as hostile and returns a reason instead of panicking.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::event::MAX_UNIQUE_HASH_LEN;
use crate::layout::LAYOUT_VERSION;
use crate::options::{AttachTerms, Transport};
use crate::sys;
use crate::wire::Offer;
use crate::wire::frame::{Body, FrameWriter, kind};

/// Version of the control protocol spoken by this build. 4: the eventfds the broker hands
/// out start at 1 and wake-ups write 0 (a build of version 3 would write 1 into them, or
/// create eventfds at 0 that a write of 0 does not wake), so builds of different versions
/// never attach to each other. 5: the INSPECT request and its INSPECT_REPLY (the live
/// inspector, `worker_events::inspect`). 6: message header byte 13 is `flags` and bytes
/// 14..16 `ext_len` (relayed events carry their origin host, unique events diverted to the
/// agent their hash; see `shm-layout.md` section 7), which a build of version 5 neither
/// writes nor refuses; and the DIVERT frame (the agent's unique-diversion patterns). 7: the
/// INSPECT_REPLY reports the broker's data queue per attached worker. 8: the ACK frame
/// (socket transport: a worker acknowledges the data frames it has dispatched, so the
/// broker can report what a killed worker never dispatched to its successor). 10: a shared
/// memory WELCOME carries one more eventfd after the slots' own, the group's fan-out
/// eventfd, which every worker registers and publishers write to wake several sleepers in
/// one syscall (`notify::Claims`); a build of version 9 would never register it and
/// sleep through such wake-ups.
pub(crate) const PROTOCOL_VERSION: u32 = 10;

/// Reason prefix of a transient refusal: the slot still looks attached because the broker
/// has not yet seen its previous holder's connection close. The client retries (backoff)
/// instead of reporting an error.
pub(crate) const BUSY_PREFIX: &str = "busy: ";

/// The data path a WELCOME announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// Rings in the shared region handed over with the frame.
    Shm,
    /// Events ride the control connections.
    Socket,
}

impl Flavor {
    /// The flavor a broker's offer announces (`None`: nothing to offer).
    pub(crate) fn of(offer: &Offer<'_>) -> Option<Flavor> {
        match offer {
            Offer::Nothing => None,
            Offer::Shm { .. } => Some(Flavor::Shm),
            Offer::Socket { .. } => Some(Flavor::Socket),
        }
    }

    fn code(self) -> u32 {
        match self {
            Flavor::Shm => 0,
            Flavor::Socket => 1,
        }
    }
}

/// What a WELCOME hands over on the shared-memory transport.
pub(crate) struct ShmWelcome {
    pub region_fd: OwnedFd,
    pub eventfds: Vec<OwnedFd>,
    pub region_id: u64,
}

/// A parsed WELCOME.
pub(crate) struct Welcome {
    /// The region and eventfds on shared memory; `None` on the socket transport.
    pub shm: Option<ShmWelcome>,
    pub broker_slot: u32,
    pub epoch: u64,
    /// Tells brokers apart: the region id on shared memory, a random id per socket broker.
    pub broker_id: u64,
}

/// Queue a HELLO: protocol and layout versions, slot, pid, then every option that must match
/// the broker's ([`AttachTerms`]): `workers u32, agent u32, ring_capacity u32,
/// unique_capacity u32, max_payload_len u32, unique_timeout_ns u64, transport u32,
/// broadcast_capacity u32`; then the
/// device and inode of the lock file the worker locked its id in (`u64, u64`; a broker
/// refuses a worker whose lock file is not its own: that lock does not exclude its peers).
pub(crate) fn hello(wr: &mut FrameWriter, slot: u32, t: &AttachTerms, lock: LockId) {
    // Validated options: ring_capacity <= 64 MiB, unique_capacity <= 2^24, max_payload_len
    // <= 16 MiB all fit.
    let narrow = |v: u64| v as u32;
    wr.frame(
        kind::HELLO,
        &[
            &PROTOCOL_VERSION.to_le_bytes(),
            &LAYOUT_VERSION.to_le_bytes(),
            &slot.to_le_bytes(),
            &sys::pid().to_le_bytes(),
            &t.workers.to_le_bytes(),
            &u32::from(t.agent).to_le_bytes(),
            &narrow(t.ring_capacity).to_le_bytes(),
            &narrow(t.unique_capacity).to_le_bytes(),
            &narrow(t.max_payload_len).to_le_bytes(),
            &t.unique_timeout_ns.to_le_bytes(),
            &t.transport.code().to_le_bytes(),
            &narrow(t.broadcast_capacity).to_le_bytes(),
            &lock.0.to_le_bytes(),
            &lock.1.to_le_bytes(),
        ],
    );
}

/// Device and inode of a lock file.
pub(crate) type LockId = (u64, u64);

/// Parse the options a HELLO carries (after protocol, layout, slot and pid).
fn parse_terms(b: &mut Body<'_>) -> Result<AttachTerms, String> {
    let (workers, agent, ring) = (b.u32()?, b.u32()?, b.u32()?);
    let (unique_capacity, max_payload_len, unique_timeout_ns) = (b.u32()?, b.u32()?, b.u64()?);
    let code = b.u32()?;
    let transport = Transport::from_code(code).ok_or_else(|| format!("unknown transport code {code}"))?;
    let broadcast_capacity = u64::from(b.u32()?);
    Ok(AttachTerms {
        workers,
        agent: agent != 0,
        ring_capacity: u64::from(ring),
        broadcast_capacity,
        unique_capacity: u64::from(unique_capacity),
        max_payload_len: u64::from(max_payload_len),
        unique_timeout_ns,
        transport,
    })
}

/// Every option of `theirs` that differs from the broker's `ours` (or, for the transport,
/// that the data path `offered` cannot satisfy), as `name theirs/ours`.
fn differences(theirs: &AttachTerms, ours: &AttachTerms, offered: Option<Flavor>) -> Vec<String> {
    let mut d = Vec::new();
    let mut cmp = |name: &str, a: String, b: String| {
        if a != b {
            d.push(format!("{name} {a}/{b}"));
        }
    };
    cmp("workers", theirs.workers.to_string(), ours.workers.to_string());
    cmp("enable_privileged_agent", theirs.agent.to_string(), ours.agent.to_string());
    cmp("ring_capacity", theirs.ring_capacity.to_string(), ours.ring_capacity.to_string());
    cmp("broadcast_capacity", theirs.broadcast_capacity.to_string(), ours.broadcast_capacity.to_string());
    cmp("unique_capacity", theirs.unique_capacity.to_string(), ours.unique_capacity.to_string());
    cmp("max_payload_len", theirs.max_payload_len.to_string(), ours.max_payload_len.to_string());
    let dur = |ns: u64| format!("{:?}", std::time::Duration::from_nanos(ns));
    cmp("unique_timeout", dur(theirs.unique_timeout_ns), dur(ours.unique_timeout_ns));
    let runs = match offered {
        Some(Flavor::Shm) => Transport::SharedMemory,
        Some(Flavor::Socket) => Transport::Socket,
        None => theirs.transport,
    };
    if theirs.transport != Transport::Auto && theirs.transport != runs {
        d.push(format!("transport {:?}/{runs:?} (the broker runs {runs:?})", theirs.transport));
    }
    d
}

/// Check a HELLO against the broker's options, the data path it offers and the slots attached
/// already; the slot to attach, or the reason to refuse (naming every option that differs,
/// as `option worker's/broker's`).
pub(crate) fn check_hello(
    body: &[u8],
    ours: &AttachTerms,
    our_lock: LockId,
    offered: Option<Flavor>,
    broker_slot: u32,
    attached: &[u32],
) -> Result<u32, String> {
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
    let theirs = parse_terms(&mut b)?;
    // Optional (a hand-written HELLO may end before it): the worker's lock file.
    if b.0.len() >= 16 {
        let lock = (b.u64()?, b.u64()?);
        if lock != our_lock {
            return Err(format!(
                "the worker locked its id in another lock file than the broker's (device:inode {}:{}, the \
                 broker's {}:{}): the lock file was removed or replaced, so its id lock does not exclude this \
                 deployment's workers",
                lock.0, lock.1, our_lock.0, our_lock.1
            ));
        }
    }
    let diff = differences(&theirs, ours, offered);
    if !diff.is_empty() {
        return Err(format!("options differ from the broker's: {}", diff.join(", ")));
    }
    let slots = ours.workers + u32::from(ours.agent);
    if slot >= slots {
        return Err(format!("slot {slot} out of range 0..{slots}"));
    }
    if slot == broker_slot || attached.contains(&slot) {
        // A well-behaved client holds the slot's lock, so the other holder is dead and its
        // connection not yet seen closed: a transient refusal, the client retries.
        return Err(format!("{BUSY_PREFIX}slot {slot} is already attached by a live process"));
    }
    Ok(slot)
}

/// Queue the WELCOME for `offer`; false (nothing queued) when there is nothing to offer.
/// The descriptors of a shared-memory offer must stay open until the writer has sent it.
pub(crate) fn welcome(wr: &mut FrameWriter, broker_slot: u32, offer: &Offer<'_>) -> bool {
    match offer {
        Offer::Nothing => false,
        Offer::Socket { epoch, broker_id } => {
            wr.frame(
                kind::WELCOME,
                &[
                    &PROTOCOL_VERSION.to_le_bytes(),
                    &Flavor::Socket.code().to_le_bytes(),
                    &broker_slot.to_le_bytes(),
                    &epoch.to_le_bytes(),
                    &broker_id.to_le_bytes(),
                    &0u32.to_le_bytes(),
                ],
            );
            true
        }
        Offer::Shm { region_fd, eventfds, epoch, region_id } => {
            let mut fds = Vec::with_capacity(1 + eventfds.len());
            fds.push(region_fd.as_raw_fd());
            fds.extend(eventfds.iter().map(|e| e.as_raw_fd()));
            wr.frame_with_fds(
                kind::WELCOME,
                &[
                    &PROTOCOL_VERSION.to_le_bytes(),
                    &Flavor::Shm.code().to_le_bytes(),
                    &broker_slot.to_le_bytes(),
                    &epoch.to_le_bytes(),
                    &region_id.to_le_bytes(),
                    &(fds.len() as u32).to_le_bytes(),
                ],
                fds,
            );
            true
        }
    }
}

/// Parse a WELCOME and the descriptors that came with it.
pub(crate) fn parse_welcome(body: &[u8], mut fds: Vec<OwnedFd>, slots: u32) -> Result<Welcome, String> {
    let mut b = Body(body);
    let proto = b.u32()?;
    if proto != PROTOCOL_VERSION {
        return Err(format!("protocol version {proto}"));
    }
    let flavor = b.u32()?;
    let broker_slot = b.u32()?;
    let epoch = b.u64()?;
    let broker_id = b.u64()?;
    let nfds = b.u32()?;
    if broker_slot >= slots {
        return Err(format!("broker slot {broker_slot} out of range 0..{slots}"));
    }
    match flavor {
        f if f == Flavor::Shm.code() => {}
        f if f == Flavor::Socket.code() && nfds == 0 && fds.is_empty() => {
            return Ok(Welcome { shm: None, broker_slot, epoch, broker_id });
        }
        f if f == Flavor::Socket.code() => return Err(format!("socket-mode WELCOME with {} descriptors", fds.len())),
        m => return Err(format!("unknown transport mode {m}")),
    }
    // The region, one eventfd per slot, and the fan-out eventfd.
    if nfds != 2 + slots || fds.len() != nfds as usize {
        return Err(format!("expected {} descriptors, frame says {nfds}, got {}", 2 + slots, fds.len()));
    }
    let eventfds = fds.split_off(1);
    for e in &eventfds {
        if !sys::EventFd::is_eventfd(e.as_fd()) {
            return Err(format!("descriptor {} is not an eventfd", e.as_raw_fd()));
        }
    }
    let region_fd = fds.pop().ok_or("missing region descriptor")?;
    Ok(Welcome { shm: Some(ShmWelcome { region_fd, eventfds, region_id: broker_id }), broker_slot, epoch, broker_id })
}

/// Queue a REJECT with its reason.
pub(crate) fn reject(wr: &mut FrameWriter, reason: &str) {
    wr.frame(kind::REJECT, &[reason.as_bytes()]);
}

/// Queue a UNIQUE: `id u64, hash_len u16, hash, message`.
pub(crate) fn unique(wr: &mut FrameWriter, id: u64, hash: &[u8], msg: &[u8]) {
    wr.frame(kind::UNIQUE, &[&id.to_le_bytes(), &(hash.len() as u16).to_le_bytes(), hash, msg]);
}

/// A parsed UNIQUE frame.
pub(crate) struct UniqueFrame<'a> {
    pub id: u64,
    pub hash: &'a [u8],
    pub msg: &'a [u8],
}

/// Parse a UNIQUE frame.
pub(crate) fn parse_unique(body: &[u8]) -> Result<UniqueFrame<'_>, String> {
    let mut b = Body(body);
    let id = b.u64()?;
    let len = b.u16()? as usize;
    if len == 0 || len > MAX_UNIQUE_HASH_LEN {
        return Err(format!("unique hash length {len} outside 1..={MAX_UNIQUE_HASH_LEN}"));
    }
    let hash = b.bytes(len)?;
    Ok(UniqueFrame { id, hash, msg: b.0 })
}

/// Queue a DIVERT frame carrying `patterns` (see `divert.rs` for the encoding).
pub(crate) fn divert(wr: &mut FrameWriter, patterns: &crate::divert::Patterns) {
    wr.frame(kind::DIVERT, &[patterns.encoded()]);
}

/// Queue a UNIQUE_ACK: unique events up to `id` are handled.
pub(crate) fn unique_ack(wr: &mut FrameWriter, id: u64) {
    wr.frame(kind::UNIQUE_ACK, &[&id.to_le_bytes()]);
}

/// Parse a UNIQUE_ACK.
pub(crate) fn parse_unique_ack(body: &[u8]) -> Result<u64, String> {
    Body(body).u64()
}

/// Parse an ACK (socket transport, client -> broker): `total u64`, the data frames of this
/// connection the worker has dispatched, and nothing after it. The broker trusts the number
/// for nothing but popping what it recorded (`wire/unacked.rs`).
pub(crate) fn parse_ack(body: &[u8]) -> Result<u64, String> {
    let mut b = Body(body);
    let total = b.u64()?;
    if !b.0.is_empty() {
        return Err(format!("{} bytes after the ACK total", b.0.len()));
    }
    Ok(total)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};

    use crate::sys;

    /// The eventfd check that works without `/proc` tells an eventfd from every other kind
    /// of descriptor a broker could pass instead (other anonymous inodes included).
    #[test]
    fn the_eventfd_check_needs_no_proc() {
        let ev = sys::EventFd::new().unwrap();
        assert!(sys::is_eventfd_without_proc(ev.as_fd()));
        assert!(sys::EventFd::is_eventfd(ev.as_fd()));
        let epoll = sys::Epoll::new().unwrap();
        let timer = sys::timerfd(std::time::Duration::from_secs(1)).unwrap();
        let memfd = sys::memfd_sealed(4096).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let (r, w) = std::io::pipe().unwrap();
        let others: [(&str, std::os::fd::BorrowedFd<'_>); 7] = [
            ("epoll", epoll.as_fd()),
            ("timerfd", timer.as_fd()),
            ("memfd", memfd.as_fd()),
            ("socket", a.as_fd()),
            ("/dev/null", null.as_fd()),
            ("pipe read end", r.as_fd()),
            ("pipe write end", w.as_fd()),
        ];
        for (what, fd) in others {
            assert!(!sys::is_eventfd_without_proc(fd), "{what} taken for an eventfd");
            assert!(!sys::EventFd::is_eventfd(fd), "{what} taken for an eventfd");
        }
    }
}
