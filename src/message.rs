//! The message codec: how an event travels between processes (see `shm-layout.md`): a
//! 16-byte header (`data_len u32, source_len u16, event_len u16, origin u32, kind u8, 3 pad`),
//! the data (16-aligned), then the source and event names. Encoding checks the publisher's
//! limits; decoding trusts nothing in the bytes.

use rkyv::rancor;
use rkyv::ser::allocator::Arena;
use rkyv::util::AlignedVec;

use crate::error::PublishError;
use crate::event::{Event, Payload, Wid};

pub(crate) const MSG_HDR: usize = 16;
pub(crate) const ORIGIN_NONE: u32 = u32::MAX;

/// What kind of publish produced a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    All = 0,
    Unique = 1,
    Current = 2,
    System = 3,
}

impl Kind {
    /// The kind stored in byte 12 of a header; `None` for an unknown value.
    pub(crate) fn from_byte(b: u8) -> Option<Kind> {
        match b {
            0 => Some(Kind::All),
            1 => Some(Kind::Unique),
            2 => Some(Kind::Current),
            3 => Some(Kind::System),
            _ => None,
        }
    }
}

/// Largest encoded message for a given `max_payload_len`.
pub(crate) fn max_message_len(max_payload_len: usize) -> usize {
    MSG_HDR + max_payload_len + 2 * u16::MAX as usize
}

/// Start a message in `buf`: room for the header; the data follows at offset 16.
pub(crate) fn begin(buf: &mut AlignedVec) {
    buf.clear();
    buf.extend_from_slice(&[0u8; MSG_HDR]);
}

/// Finish a message whose data has been appended after [`begin`].
pub(crate) fn finish(
    buf: &mut AlignedVec,
    source: &str,
    event: &str,
    origin: u32,
    kind: Kind,
    max_payload_len: usize,
) -> Result<(), PublishError> {
    let data_len = buf.len() - MSG_HDR;
    if data_len > max_payload_len {
        return Err(PublishError::PayloadTooLarge { limit: max_payload_len });
    }
    if source.len() > u16::MAX as usize || event.len() > u16::MAX as usize {
        return Err(PublishError::NameTooLong);
    }
    buf.extend_from_slice(source.as_bytes());
    buf.extend_from_slice(event.as_bytes());
    let h = &mut buf[..MSG_HDR];
    h[0..4].copy_from_slice(&(data_len as u32).to_le_bytes());
    h[4..6].copy_from_slice(&(source.len() as u16).to_le_bytes());
    h[6..8].copy_from_slice(&(event.len() as u16).to_le_bytes());
    h[8..12].copy_from_slice(&origin.to_le_bytes());
    h[12] = kind as u8;
    h[13] = 0;
    h[14..16].copy_from_slice(&[0, 0]);
    Ok(())
}

/// Encode a raw-bytes message into `buf`.
pub(crate) fn encode_bytes(
    buf: &mut AlignedVec,
    source: &str,
    event: &str,
    data: &[u8],
    origin: u32,
    kind: Kind,
    max_payload_len: usize,
) -> Result<(), PublishError> {
    if data.len() > max_payload_len {
        return Err(PublishError::PayloadTooLarge { limit: max_payload_len });
    }
    begin(buf);
    buf.extend_from_slice(data);
    finish(buf, source, event, origin, kind, max_payload_len)
}

/// [`encode_typed`] with the caller's serialization arena (no thread-local arena to take
/// and put back per event).
#[allow(clippy::too_many_arguments)] // encode_typed's seven, plus the arena
pub(crate) fn encode_typed_in<T: Payload>(
    buf: &mut AlignedVec,
    arena: &mut Arena,
    source: &str,
    event: &str,
    value: &T,
    origin: u32,
    kind: Kind,
    max_payload_len: usize,
) -> Result<(), PublishError> {
    begin(buf);
    let taken = std::mem::take(buf);
    match rkyv::api::high::to_bytes_in_with_alloc::<_, _, rancor::Error>(value, taken, arena.acquire()) {
        Ok(b) => *buf = b,
        Err(e) => return Err(PublishError::Serialize(e.to_string())),
    }
    finish(buf, source, event, origin, kind, max_payload_len)
}

/// Encode a typed message into `buf` (rkyv, serialized once for every receiver) with a
/// fresh arena: for the library's rare notices; `publish` uses the worker's own arena.
pub(crate) fn encode_typed<T: Payload>(
    buf: &mut AlignedVec,
    source: &str,
    event: &str,
    value: &T,
    origin: u32,
    kind: Kind,
    max_payload_len: usize,
) -> Result<(), PublishError> {
    encode_typed_in(buf, &mut Arena::new(), source, event, value, origin, kind, max_payload_len)
}

/// A decoded message header, all lengths checked against the buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decoded<'a> {
    pub event: Event<'a>,
    pub kind: Kind,
}

/// Why a received message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// A message whose header and lengths are checked but whose names are not validated as
/// UTF-8 yet: the receiver's subscription memo skips the validation for a name pair it has
/// already seen (`Subscriptions::run_raw`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Raw<'a> {
    pub source: &'a [u8],
    pub event: &'a [u8],
    pub data: &'a [u8],
    pub wid: Option<Wid>,
    pub kind: Kind,
}

/// Decode a message received from another process. Nothing in it is trusted.
pub(crate) fn decode(buf: &[u8], workers: u32, agent: bool, max_payload_len: usize) -> Result<Decoded<'_>, Malformed> {
    let r = decode_raw(buf, workers, agent, max_payload_len)?;
    let source = std::str::from_utf8(r.source).map_err(|_| Malformed)?;
    let event = std::str::from_utf8(r.event).map_err(|_| Malformed)?;
    Ok(Decoded { event: Event { source, event, data: r.data, wid: r.wid }, kind: r.kind })
}

/// [`decode`] without the UTF-8 validation of the names (the caller validates them, or
/// compares them with names it validated before).
pub(crate) fn decode_raw(buf: &[u8], workers: u32, agent: bool, max_payload_len: usize) -> Result<Raw<'_>, Malformed> {
    if buf.len() < MSG_HDR {
        return Err(Malformed);
    }
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    let u16_at = |i: usize| u16::from_le_bytes(buf[i..i + 2].try_into().expect("2 bytes")) as usize;
    let data_len = u32_at(0) as usize;
    let (src_len, ev_len) = (u16_at(4), u16_at(6));
    let origin = u32_at(8);
    let kind = Kind::from_byte(buf[12]).ok_or(Malformed)?;
    if data_len > max_payload_len || MSG_HDR + data_len + src_len + ev_len != buf.len() {
        return Err(Malformed);
    }
    let data = &buf[MSG_HDR..MSG_HDR + data_len];
    let src_start = MSG_HDR + data_len;
    let source = &buf[src_start..src_start + src_len];
    let event = &buf[src_start + src_len..];
    let wid = match origin {
        ORIGIN_NONE => None,
        o if o < workers => Some(Wid::Worker(o)),
        o if agent && o == workers => Some(Wid::PrivilegedAgent),
        _ => return Err(Malformed),
    };
    Ok(Raw { source, event, data, wid, kind })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_alignment() {
        let mut buf = AlignedVec::new();
        encode_typed(&mut buf, "src", "ev", &12345u64, 2, Kind::All, 1024).unwrap();
        let d = decode(&buf, 4, false, 1024).unwrap();
        assert_eq!((d.event.source, d.event.event, d.event.wid), ("src", "ev", Some(Wid::Worker(2))));
        let mut own = AlignedVec::new();
        encode_typed_in(&mut own, &mut Arena::new(), "src", "ev", &12345u64, 2, Kind::All, 1024).unwrap();
        assert_eq!(own.as_slice(), buf.as_slice(), "the same bytes with the caller's arena");
        assert_eq!(d.event.data.as_ptr() as usize % 16, 0);
        assert_eq!(d.event.deserialize::<u64>().unwrap(), 12345);
    }

    #[test]
    fn payload_limit_is_exact() {
        let mut buf = AlignedVec::new();
        assert!(encode_bytes(&mut buf, "s", "e", &[0u8; 100], 0, Kind::All, 100).is_ok());
        let e = encode_bytes(&mut buf, "s", "e", &[0u8; 101], 0, Kind::All, 100).unwrap_err();
        assert_eq!(e.to_string(), "failed to publish event: payload exceeds the limitation (100)");
        // Names do not count against the limit.
        let long = "x".repeat(1000);
        assert!(encode_bytes(&mut buf, &long, &long, &[0u8; 100], 0, Kind::All, 100).is_ok());
    }

    #[test]
    fn hostile_messages_are_refused() {
        let mut buf = AlignedVec::new();
        encode_bytes(&mut buf, "s", "e", b"data", 1, Kind::All, 100).unwrap();
        let good = buf.to_vec();
        assert!(decode(&good, 4, false, 100).is_ok());
        assert!(decode(&good[..good.len() - 1], 4, false, 100).is_err());
        assert!(decode(&good[..8], 4, false, 100).is_err());
        let mut bad = good.clone();
        bad[0] = 0xff; // data_len beyond the buffer
        assert!(decode(&bad, 4, false, 100).is_err());
        let mut bad = good.clone();
        bad[8] = 9; // origin outside the slots
        assert!(decode(&bad, 4, false, 100).is_err());
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 1] = 0xff; // invalid UTF-8 in the event name
        assert!(decode(&bad, 4, false, 100).is_err());
        assert!(decode(&good, 4, false, 3).is_err()); // over the receiver's payload limit
    }
}
