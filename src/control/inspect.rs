//! The live inspector's exchange (`worker_events::inspect`): one INSPECT request on a fresh
//! control connection, one INSPECT_REPLY (or REJECT) back, then the broker closes it. The
//! inspector never sends HELLO, so it takes no slot; the broker checks its uid at accept
//! (`SO_PEERCRED`) exactly as a worker's.
//!
//! INSPECT body: `protocol u32`. INSPECT_REPLY body: `protocol u32, flavor u32 (0 shared
//! memory, 1 socket), broker_slot u32, broker_pid u32, epoch u64, broker_id u64, workers u32,
//! agent u32, ring_capacity u32, unique_capacity u32, broadcast_capacity u32, n u32`, then `n` times `slot u32,
//! pid u32, queued_frames u64, queued_bytes u64`: the slots attached to the broker, their
//! peers' pids as the kernel reported them at accept, and what the broker's outbound data
//! queue holds for them (socket transport; `u64::MAX` for none: shared memory). On shared memory the region memfd rides with it (`SCM_RIGHTS`, one
//! descriptor); on the socket transport, none.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::protocol::{Flavor, PROTOCOL_VERSION};
use crate::error::{Error, Result};
use crate::options::{AttachTerms, MAX_WORKERS};
use crate::sys::{self, Epoll};
use crate::wire::Offer;
use crate::wire::frame::{Body, FrameReader, FrameWriter, ReadState, kind};

/// Longest INSPECT_REPLY: its fixed part plus one attached entry per possible slot.
const REPLY_MAX_FRAME: usize = 64 + ENTRY * (MAX_WORKERS as usize + 1);
/// Bytes of one attached entry: slot, pid, queued frames, queued bytes.
const ENTRY: usize = 24;
/// `queued_*` of an entry whose slot has no socket data queue at the broker.
const NO_QUEUE: u64 = u64::MAX;

/// One worker attached to the broker, as an INSPECT_REPLY reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttachedSlot {
    pub slot: u32,
    /// As the kernel reported it at accept (`SO_PEERCRED`).
    pub pid: u32,
    /// The broker's outbound data queue for it (socket transport): `(frames, bytes)` not
    /// completely written.
    pub queued: Option<(u64, u64)>,
}

/// What the broker told an inspector.
#[derive(Debug)]
pub(crate) struct InspectReply {
    /// The region memfd on shared memory; `None` on the socket transport.
    pub region_fd: Option<OwnedFd>,
    /// The broker's slot and pid.
    pub serving_slot: u32,
    pub serving_pid: u32,
    pub epoch: u64,
    pub workers: u32,
    pub agent: bool,
    pub ring_capacity: usize,
    pub broadcast_capacity: usize,
    pub unique_capacity: usize,
    /// Every worker attached to the broker (the broker's own slot excluded).
    pub attached: Vec<AttachedSlot>,
}

/// Check an INSPECT request: its protocol version.
pub(super) fn check_request(body: &[u8]) -> std::result::Result<(), String> {
    let proto = Body(body).u32()?;
    if proto != PROTOCOL_VERSION {
        return Err(format!("control protocol version {proto}, the broker speaks {PROTOCOL_VERSION}"));
    }
    Ok(())
}

/// Queue the INSPECT_REPLY for `offer`; false (nothing queued) when there is nothing to
/// offer yet. `attached`: the attached connections.
pub(super) fn reply(
    wr: &mut FrameWriter,
    broker_slot: u32,
    terms: &AttachTerms,
    offer: &Offer<'_>,
    attached: &[AttachedSlot],
) -> bool {
    let (flavor, epoch, broker_id, fds) = match offer {
        Offer::Nothing => return false,
        Offer::Socket { epoch, broker_id } => (Flavor::Socket, *epoch, *broker_id, Vec::new()),
        Offer::Shm { region_fd, epoch, region_id, .. } => {
            (Flavor::Shm, *epoch, *region_id, vec![region_fd.as_raw_fd()])
        }
    };
    let mut pairs = Vec::with_capacity(attached.len() * ENTRY);
    for a in attached {
        let (frames, bytes) = a.queued.unwrap_or((NO_QUEUE, NO_QUEUE));
        for w in [&a.slot.to_le_bytes()[..], &a.pid.to_le_bytes(), &frames.to_le_bytes(), &bytes.to_le_bytes()] {
            pairs.extend_from_slice(w);
        }
    }
    // Validated options: ring_capacity <= 64 MiB and unique_capacity <= 2^24 fit in u32.
    let narrow = |v: u64| v as u32;
    let body: [&[u8]; 13] = [
        &PROTOCOL_VERSION.to_le_bytes(),
        &u32::from(flavor == Flavor::Socket).to_le_bytes(),
        &broker_slot.to_le_bytes(),
        &sys::pid().to_le_bytes(),
        &epoch.to_le_bytes(),
        &broker_id.to_le_bytes(),
        &terms.workers.to_le_bytes(),
        &u32::from(terms.agent).to_le_bytes(),
        &narrow(terms.ring_capacity).to_le_bytes(),
        &narrow(terms.unique_capacity).to_le_bytes(),
        &narrow(terms.broadcast_capacity).to_le_bytes(),
        &(attached.len() as u32).to_le_bytes(),
        &pairs,
    ];
    if fds.is_empty() {
        wr.frame(kind::INSPECT_REPLY, &body);
    } else {
        wr.frame_with_fds(kind::INSPECT_REPLY, &body, fds);
    }
    true
}

/// Parse an INSPECT_REPLY and its descriptors; every field is range-checked (the process
/// listening on the socket is of our uid, but may be buggy).
pub(crate) fn parse_reply(body: &[u8], mut fds: Vec<OwnedFd>) -> std::result::Result<InspectReply, String> {
    let mut b = Body(body);
    let proto = b.u32()?;
    if proto != PROTOCOL_VERSION {
        return Err(format!("control protocol version {proto}, this build speaks {PROTOCOL_VERSION}"));
    }
    let flavor = b.u32()?;
    let (broker_slot, broker_pid, epoch, _broker_id) = (b.u32()?, b.u32()?, b.u64()?, b.u64()?);
    let (workers, agent, ring_capacity, unique_capacity) = (b.u32()?, b.u32()?, b.u32()?, b.u32()?);
    if workers == 0 || workers > MAX_WORKERS || agent > 1 {
        return Err(format!("workers {workers}, agent {agent} out of range"));
    }
    if !ring_capacity.is_power_of_two() || !(4096..=64 << 20).contains(&ring_capacity) {
        return Err(format!("ring capacity {ring_capacity} out of range"));
    }
    if unique_capacity == 0 || unique_capacity > 1 << 24 {
        return Err(format!("unique capacity {unique_capacity} out of range"));
    }
    let broadcast_capacity = b.u32()?;
    if broadcast_capacity != 0
        && (!broadcast_capacity.is_power_of_two() || !(4096..=64 << 20).contains(&broadcast_capacity))
    {
        return Err(format!("broadcast capacity {broadcast_capacity} out of range"));
    }
    let slots = workers + agent;
    if broker_slot >= slots {
        return Err(format!("broker slot {broker_slot} out of range 0..{slots}"));
    }
    let n = b.u32()?;
    if n > slots {
        return Err(format!("{n} attached slots, more than {slots}"));
    }
    let mut attached = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (slot, pid, frames, bytes) = (b.u32()?, b.u32()?, b.u64()?, b.u64()?);
        if slot >= slots || slot == broker_slot || attached.iter().any(|a: &AttachedSlot| a.slot == slot) {
            return Err(format!("attached slot {slot} out of range or repeated"));
        }
        let queued = match (frames, bytes) {
            (NO_QUEUE, NO_QUEUE) => None,
            (f, b) if f <= b => Some((f, b)),
            (f, b) => return Err(format!("slot {slot}: {f} queued frames in {b} bytes")),
        };
        attached.push(AttachedSlot { slot, pid, queued });
    }
    let region_fd = match (flavor, fds.len()) {
        (0, 1) => fds.pop(),
        (1, 0) => None,
        (f, k) => return Err(format!("transport code {f} with {k} descriptors")),
    };
    Ok(InspectReply {
        region_fd,
        serving_slot: broker_slot,
        serving_pid: broker_pid,
        epoch,
        workers,
        agent: agent == 1,
        ring_capacity: ring_capacity as usize,
        unique_capacity: unique_capacity as usize,
        broadcast_capacity: broadcast_capacity as usize,
        attached,
    })
}

/// Ask the broker listening on `path` for its view: one connection, one request, one reply
/// of at most [`REPLY_MAX_FRAME`] bytes, everything within `timeout`.
pub(crate) fn request(path: &Path, timeout: Duration) -> Result<InspectReply> {
    let deadline = Instant::now() + timeout;
    let fd = sys::connect_unix(path).map_err(|e| Error::io("connecting to the control socket", e))?;
    let mut wr = FrameWriter::default();
    wr.frame(kind::INSPECT, &[&PROTOCOL_VERSION.to_le_bytes()]);
    // A fresh socket's buffer takes a 9-byte frame whole. A broker that refuses at accept
    // (a foreign uid) may have answered and closed already: its REJECT is still to be read.
    let sent = match wr.flush(fd.as_fd()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(std::io::ErrorKind::WouldBlock.into()),
        Err(e) => Err(e),
    };
    let epoll = Epoll::new().map_err(|e| Error::io("creating an epoll set", e))?;
    epoll.add(fd.as_fd(), 0).map_err(|e| Error::io("creating an epoll set", e))?;
    let mut rd = FrameReader::new(REPLY_MAX_FRAME);
    let mut fds = Vec::new();
    let mut ready = Vec::new();
    let bad = |m: String| Error::AttachRefused(format!("bad inspect reply: {m}"));
    loop {
        let state = rd.fill(fd.as_fd(), Some(&mut fds), REPLY_MAX_FRAME + 8);
        match rd.next_frame().map_err(bad)? {
            Some((kind::INSPECT_REPLY, body)) => {
                // Nothing of a reply is used unless it comes from our own uid (a REJECT is
                // reported whoever sends it: the broker's refusal of a foreign uid).
                let (_, uid) =
                    sys::peer_cred(fd.as_fd()).map_err(|e| Error::io("reading the broker's credentials", e))?;
                if uid != sys::euid() {
                    let why = format!("the process listening on {} runs as uid {uid}", path.display());
                    let e = std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
                    return Err(Error::io("checking the broker's uid", e));
                }
                return parse_reply(body, std::mem::take(&mut fds)).map_err(bad);
            }
            Some((kind::REJECT, body)) => {
                return Err(Error::AttachRefused(String::from_utf8_lossy(body).into_owned()));
            }
            Some((k, _)) => return Err(bad(format!("unexpected frame kind {k}"))),
            None => {}
        }
        match state {
            Ok(ReadState::Open) => {}
            Ok(ReadState::Closed) => {
                sent.map_err(|e| Error::io("sending the inspect request", e))?;
                return Err(Error::io("reading the inspect reply", std::io::ErrorKind::UnexpectedEof));
            }
            Err(e) => {
                sent.map_err(|e| Error::io("sending the inspect request", e))?;
                return Err(Error::io("reading the inspect reply", e));
            }
        }
        if let Err(e) = &sent {
            // Nothing more will come after a failed send but what was read already.
            return Err(Error::io("sending the inspect request", std::io::Error::new(e.kind(), e.to_string())));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::io("waiting for the inspect reply", std::io::ErrorKind::TimedOut));
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        epoll.wait(&mut ready, ms).map_err(|e| Error::io("waiting for the inspect reply", e))?;
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::options::{DEFAULT_RING_CAPACITY, Transport};

    fn terms(workers: u32) -> AttachTerms {
        AttachTerms {
            workers,
            agent: true,
            ring_capacity: DEFAULT_RING_CAPACITY as u64,
            broadcast_capacity: 0,
            unique_capacity: 1024,
            max_payload_len: 1 << 16,
            unique_timeout_ns: 1_000_000_000,
            transport: Transport::Socket,
        }
    }

    /// The body of the one frame `wr` holds (after `len u32, kind u8`).
    fn body(wr: &mut FrameWriter) -> Vec<u8> {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(wr.flush(a.as_fd()).unwrap());
        let mut rd = FrameReader::new(REPLY_MAX_FRAME);
        rd.fill(b.as_fd(), None, usize::MAX).unwrap();
        let (k, body) = rd.next_frame().unwrap().expect("a frame");
        assert_eq!(k, kind::INSPECT_REPLY);
        body.to_vec()
    }

    #[test]
    fn a_reply_round_trips_and_every_field_is_range_checked() {
        let mut wr = FrameWriter::default();
        let offer = Offer::Socket { epoch: 7, broker_id: 9 };
        let a = |slot, pid, queued| AttachedSlot { slot, pid, queued };
        let attached = [a(0, 100, Some((2, 130))), a(3, 103, None)];
        assert!(reply(&mut wr, 1, &terms(3), &offer, &attached));
        let good = body(&mut wr);
        let r = parse_reply(&good, Vec::new()).unwrap();
        assert_eq!((r.serving_slot, r.epoch, r.workers, r.agent), (1, 7, 3, true));
        assert_eq!(r.attached, attached.to_vec());
        assert!(r.region_fd.is_none());
        assert!(!reply(&mut FrameWriter::default(), 1, &terms(3), &Offer::Nothing, &[]));
        // Corrupt one little-endian u32 field at `off` at a time.
        let with = |off: usize, v: u32| {
            let mut b = good.clone();
            b[off..off + 4].copy_from_slice(&v.to_le_bytes());
            parse_reply(&b, Vec::new()).err().unwrap_or_else(|| panic!("field at {off} = {v} accepted"))
        };
        assert!(with(0, PROTOCOL_VERSION + 1).contains("protocol version"));
        assert!(with(4, 0).contains("descriptors"), "shared memory without the region");
        assert!(with(8, 4).contains("broker slot 4"));
        assert!(with(32, 0).contains("workers 0"));
        assert!(with(32, MAX_WORKERS + 1).contains("out of range"));
        assert!(with(36, 2).contains("agent 2"));
        assert!(with(40, 4097).contains("ring capacity"));
        assert!(with(44, (1 << 24) + 1).contains("unique capacity"));
        assert!(with(48, 4097).contains("broadcast capacity"));
        assert!(with(52, 5).contains("more than 4"));
        assert!(with(56, 1).contains("attached slot 1"), "the broker's own slot");
        assert!(with(80, 0).contains("repeated"));
        let mut b = good.clone();
        b[64..72].copy_from_slice(&131u64.to_le_bytes());
        let e = parse_reply(&b, Vec::new()).expect_err("more frames than bytes accepted");
        assert!(e.contains("131 queued frames in 130 bytes"), "{e}");
        assert!(parse_reply(&good[..good.len() - 1], Vec::new()).is_err(), "truncated");
    }
}
