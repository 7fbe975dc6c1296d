//! The message codec: how an event travels between processes (see `shm-layout.md`): a
//! 16-byte header (`data_len u32, source_len u16, event_len u16, origin u32, kind u8,
//! flags u8, ext_len u16`), the data (16-aligned), the source and event names, then the
//! extension bytes the flags announce (the origin host of a relayed event, or the hash of a
//! unique event diverted to the agent). Encoding checks the publisher's limits; decoding
//! trusts nothing in the bytes. An ordinary event has `flags == 0` and `ext_len == 0`: the
//! decoder tells so with one compare of the header's last word.

use rkyv::rancor;
use rkyv::ser::allocator::Arena;
use rkyv::util::AlignedVec;

use crate::error::PublishError;
pub(crate) use crate::event::MAX_ORIGIN_HOST_LEN;
use crate::event::{Event, MAX_UNIQUE_HASH_LEN, Payload, Wid};

pub(crate) const MSG_HDR: usize = 16;
pub(crate) const ORIGIN_NONE: u32 = u32::MAX;

/// Header flag (byte 13) bit 0: the extension bytes are the name of the host the event was
/// relayed from (`Worker::publish_relayed`).
pub(crate) const FLAG_ORIGIN_HOST: u8 = 1;
/// Header flag bit 1: a unique event diverted to the agent; the extension bytes are its hash.
pub(crate) const FLAG_UNIQUE_HASH: u8 = 2;
/// Longest extension (the longer of a host name and a unique hash).
pub(crate) const MAX_EXT_LEN: usize =
    if MAX_UNIQUE_HASH_LEN > MAX_ORIGIN_HOST_LEN { MAX_UNIQUE_HASH_LEN } else { MAX_ORIGIN_HOST_LEN };

/// What a message's extension bytes carry (header byte 13 says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Ext<'a> {
    /// An ordinary event: no extension.
    #[default]
    None,
    /// Relayed from another host by a bridge: that host's name.
    OriginHost(&'a str),
    /// A unique event diverted to the agent: its hash.
    UniqueHash(&'a str),
}

impl<'a> Ext<'a> {
    /// The header flag and the bytes of this extension.
    fn parts(self) -> (u8, &'a [u8]) {
        match self {
            Ext::None => (0, &[]),
            Ext::OriginHost(h) => (FLAG_ORIGIN_HOST, h.as_bytes()),
            Ext::UniqueHash(h) => (FLAG_UNIQUE_HASH, h.as_bytes()),
        }
    }
}

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

/// The publisher slot in a message's header (bytes 8..12), unchecked but for "none"; for
/// messages validated already (a broker's queues hold only those).
pub(crate) fn origin_of(msg: &[u8]) -> Option<u32> {
    let o = u32::from_le_bytes(msg.get(8..12)?.try_into().ok()?);
    (o != ORIGIN_NONE).then_some(o)
}

/// Largest encoded message for a given `max_payload_len`.
pub(crate) fn max_message_len(max_payload_len: usize) -> usize {
    MSG_HDR + max_payload_len + 2 * u16::MAX as usize + MAX_EXT_LEN
}

/// Stamp a finished message (from [`finish`], with no extension yet) with `ext`: the bytes
/// are appended after the event name and the header's flags and `ext_len` set. The caller
/// checked the extension's length ([`MAX_ORIGIN_HOST_LEN`], [`MAX_UNIQUE_HASH_LEN`]).
pub(crate) fn set_ext(buf: &mut AlignedVec, ext: Ext<'_>) {
    let (flag, bytes) = ext.parts();
    debug_assert!(buf.len() >= MSG_HDR && buf[13] == 0 && bytes.len() <= MAX_EXT_LEN);
    buf.extend_from_slice(bytes);
    buf[13] = flag;
    buf[14..16].copy_from_slice(&(bytes.len() as u16).to_le_bytes());
}

/// Remove the extension of a message this process stamped (or checked) itself with
/// [`set_ext`]: its bytes are returned and the header's flags and `ext_len` zeroed.
pub(crate) fn take_ext(buf: &mut AlignedVec) -> Vec<u8> {
    if buf.len() < MSG_HDR || buf[13] == 0 {
        return Vec::new();
    }
    let ext_len = (u16::from_le_bytes([buf[14], buf[15]]) as usize).min(buf.len() - MSG_HDR);
    let ext = buf[buf.len() - ext_len..].to_vec();
    buf.resize(buf.len() - ext_len, 0);
    buf[13..16].copy_from_slice(&[0, 0, 0]);
    ext
}

/// The source and event names of a message this process encoded (or checked) itself; empty
/// names for a buffer too short to hold them.
pub(crate) fn names(buf: &[u8]) -> (&[u8], &[u8]) {
    if buf.len() < MSG_HDR {
        return (&[], &[]);
    }
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes")) as usize;
    let u16_at = |i: usize| u16::from_le_bytes(buf[i..i + 2].try_into().expect("2 bytes")) as usize;
    let src = MSG_HDR + u32_at(0);
    let ev = src + u16_at(4);
    let end = ev + u16_at(6);
    match (buf.get(src..ev), buf.get(ev..end)) {
        (Some(s), Some(e)) => (s, e),
        _ => (&[], &[]),
    }
}

/// The source then the event name, as one run of bytes, of a message this process encoded
/// (or checked) itself; empty for a buffer too short to hold them.
pub(crate) fn joined_names(buf: &[u8]) -> &[u8] {
    let Some(h) = buf.get(..MSG_HDR) else { return &[] };
    let src = MSG_HDR + u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let len = usize::from(u16::from_le_bytes([h[4], h[5]])) + usize::from(u16::from_le_bytes([h[6], h[7]]));
    buf.get(src..src + len).unwrap_or(&[])
}

/// The header flags of a message (0 for an ordinary event).
pub(crate) fn flags(buf: &[u8]) -> u8 {
    buf.get(13).copied().unwrap_or(0)
}

/// Start a message in `buf`: room for the header; the data follows at offset 16.
pub(crate) fn begin(buf: &mut AlignedVec) {
    buf.clear();
    buf.extend_from_slice(&[0u8; MSG_HDR]);
    // Always true (`MSG_HDR` bytes appended to an empty vector), but the optimizer loses the
    // length across the out-of-line growth path; checked here, the serializer's first
    // alignment padding is known to be empty, and no `memset` call is made for it.
    assert_eq!(buf.len(), MSG_HDR);
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
/// already seen (`Subscriptions::run_joined`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Raw<'a> {
    /// The source name then the event name: the message's bytes that hold both names.
    pub names: &'a [u8],
    /// The source name's length (the first `src_len` bytes of `names`; at most `names.len()`).
    pub src_len: usize,
    pub data: &'a [u8],
    pub wid: Option<Wid>,
    pub kind: Kind,
    /// The extension (checked: one known flag, UTF-8, within its length bound).
    pub ext: Ext<'a>,
}

impl<'a> Raw<'a> {
    /// The source name's bytes (not validated).
    pub fn source(&self) -> &'a [u8] {
        &self.names[..self.src_len]
    }
    /// The event name's bytes (not validated).
    pub fn event(&self) -> &'a [u8] {
        &self.names[self.src_len..]
    }
}

/// Decode a message received from another process. Nothing in it is trusted.
pub(crate) fn decode(buf: &[u8], workers: u32, agent: bool, max_payload_len: usize) -> Result<Decoded<'_>, Malformed> {
    let r = decode_raw(buf, workers, agent, max_payload_len)?;
    let source = std::str::from_utf8(r.source()).map_err(|_| Malformed)?;
    let event = std::str::from_utf8(r.event()).map_err(|_| Malformed)?;
    Ok(Decoded { event: Event { source, event, data: r.data, wid: r.wid, ext: r.ext }, kind: r.kind })
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
    // Bytes 13..16: flags and ext_len, both zero for an ordinary event (one compare).
    let ext_len = if buf[13..16] == [0, 0, 0] { 0 } else { u16_at(14) };
    if data_len > max_payload_len || MSG_HDR + data_len + src_len + ev_len + ext_len != buf.len() {
        return Err(Malformed);
    }
    let data = &buf[MSG_HDR..MSG_HDR + data_len];
    let src_start = MSG_HDR + data_len;
    let ev_start = src_start + src_len;
    let names = &buf[src_start..ev_start + ev_len];
    let ext =
        if ext_len == 0 && buf[13] == 0 { Ext::None } else { decode_ext(buf[13], &buf[ev_start + ev_len..], kind)? };
    let wid = match origin {
        ORIGIN_NONE => None,
        o if o < workers => Some(Wid::Worker(o)),
        o if agent && o == workers => Some(Wid::PrivilegedAgent),
        _ => return Err(Malformed),
    };
    Ok(Raw { names, src_len, data, wid, kind, ext })
}

/// The extension of a message whose flags byte is `flags` (not both zero with its length):
/// exactly one known flag, a non-empty UTF-8 value within its bound, and a unique hash only
/// on a unique event.
#[cold]
fn decode_ext(flags: u8, bytes: &[u8], kind: Kind) -> Result<Ext<'_>, Malformed> {
    let text = std::str::from_utf8(bytes).map_err(|_| Malformed)?;
    match flags {
        FLAG_ORIGIN_HOST if !text.is_empty() && text.len() <= MAX_ORIGIN_HOST_LEN => Ok(Ext::OriginHost(text)),
        FLAG_UNIQUE_HASH if kind == Kind::Unique && !text.is_empty() && text.len() <= MAX_UNIQUE_HASH_LEN => {
            Ok(Ext::UniqueHash(text))
        }
        _ => Err(Malformed),
    }
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

    /// An extension round-trips on every kind it may ride, and the header of an ordinary
    /// event stays all zeros past the kind byte.
    #[test]
    fn extensions_round_trip() {
        let mut buf = AlignedVec::new();
        encode_bytes(&mut buf, "s", "e", b"data", 1, Kind::All, 100).unwrap();
        assert_eq!(&buf[13..16], &[0, 0, 0]);
        assert_eq!(decode(&buf, 4, false, 100).unwrap().event.ext, Ext::None);
        set_ext(&mut buf, Ext::OriginHost("host-b"));
        assert_eq!((buf[13], &buf[14..16]), (FLAG_ORIGIN_HOST, &[6u8, 0][..]));
        let d = decode(&buf, 4, false, 100).unwrap();
        assert_eq!((d.event.source, d.event.event, d.event.data), ("s", "e", &b"data"[..]));
        assert_eq!((d.event.origin_host(), d.event.unique_hash()), (Some("host-b"), None));
        encode_typed(&mut buf, "s", "e", &7u64, 1, Kind::Unique, 100).unwrap();
        set_ext(&mut buf, Ext::UniqueHash("k1"));
        let d = decode(&buf, 4, false, 100).unwrap();
        assert_eq!((d.event.origin_host(), d.event.unique_hash()), (None, Some("k1")));
        assert_eq!(d.event.deserialize::<u64>().unwrap(), 7, "the data is still 16-aligned and whole");
        // Taken off again (a diverted event routed on the host after all): the plain message.
        let stamped = buf.to_vec();
        assert_eq!(take_ext(&mut buf), b"k1");
        let mut plain = AlignedVec::new();
        encode_typed(&mut plain, "s", "e", &7u64, 1, Kind::Unique, 100).unwrap();
        assert_eq!(&buf[..], &plain[..], "from {stamped:?}");
        assert!(take_ext(&mut buf).is_empty(), "nothing more to take");
        let long = "h".repeat(MAX_EXT_LEN);
        encode_bytes(&mut buf, "s", "e", b"", 1, Kind::Unique, 100).unwrap();
        set_ext(&mut buf, Ext::UniqueHash(&long));
        assert!(decode(&buf, 4, false, 100).is_ok(), "the longest hash");
        assert!(buf.len() <= max_message_len(0), "max_message_len covers the extension");
    }

    /// Every inconsistent flags/ext_len combination is refused: unknown bits, both bits,
    /// a length without a flag, a flag without a length, lengths past the buffer, non-UTF-8
    /// bytes, over-long values, and a unique hash on a non-unique event.
    #[test]
    fn malformed_extensions_are_refused() {
        let mut buf = AlignedVec::new();
        encode_bytes(&mut buf, "s", "e", b"data", 1, Kind::All, 100).unwrap();
        let plain = buf.to_vec();
        set_ext(&mut buf, Ext::OriginHost("hb"));
        let good = buf.to_vec();
        assert!(decode(&good, 4, false, 100).is_ok());
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            b
        };
        for (what, bad) in [
            ("unknown flag bit", with(&|b| b[13] = 4)),
            ("high flag bit", with(&|b| b[13] = 0x80 | FLAG_ORIGIN_HOST)),
            ("both bits", with(&|b| b[13] = FLAG_ORIGIN_HOST | FLAG_UNIQUE_HASH)),
            ("unique hash on an all event", with(&|b| b[13] = FLAG_UNIQUE_HASH)),
            ("ext_len without a flag", with(&|b| b[13] = 0)),
            ("ext_len past the buffer", with(&|b| b[14] = 3)),
            ("ext_len short of the buffer", with(&|b| b[14] = 1)),
            ("huge ext_len", with(&|b| b[14..16].copy_from_slice(&u16::MAX.to_le_bytes()))),
            ("non-UTF-8 ext", with(&|b| *b.last_mut().unwrap() = 0xff)),
            ("a flag with no bytes", {
                let mut b = plain.clone();
                b[13] = FLAG_ORIGIN_HOST;
                b
            }),
            ("a length with no bytes", {
                let mut b = plain.clone();
                b[14] = 2;
                b
            }),
            ("host over 255 bytes", {
                let mut b = plain.clone();
                b[13] = FLAG_ORIGIN_HOST;
                b[14..16].copy_from_slice(&256u16.to_le_bytes());
                b.extend_from_slice(&[b'h'; 256]);
                b
            }),
        ] {
            assert!(decode(&bad, 4, false, 100).is_err(), "{what} accepted by decode");
            assert!(decode_raw(&bad, 4, false, 100).is_err(), "{what} accepted by decode_raw");
        }
        // A unique hash longer than a unique hash may be is refused too.
        encode_bytes(&mut buf, "s", "e", b"", 1, Kind::Unique, 100).unwrap();
        buf[13] = FLAG_UNIQUE_HASH;
        buf[14..16].copy_from_slice(&257u16.to_le_bytes());
        buf.extend_from_slice(&[b'k'; 257]);
        assert!(decode(&buf, 4, false, 100).is_err());
    }

    #[cfg(not(miri))]
    mod prop {
        use proptest::prelude::*;

        use super::*;

        fn ext() -> impl Strategy<Value = (u8, String)> {
            prop_oneof![
                Just((0u8, String::new())),
                "[a-z0-9.-]{1,255}".prop_map(|h| (FLAG_ORIGIN_HOST, h)),
                "\\PC{1,64}".prop_map(|h| (FLAG_UNIQUE_HASH, h)),
            ]
        }

        proptest! {
            /// Any message round-trips with its extension; any single corrupted header
            /// byte 13..16 is either refused or decodes to the same names and data.
            #[test]
            fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..200), source in "\\PC{0,20}",
                          event in "\\PC{0,20}", (flag, value) in ext(), unique in any::<bool>(),
                          at in 13usize..16, byte in any::<u8>()) {
                let kind = if unique || flag == FLAG_UNIQUE_HASH { Kind::Unique } else { Kind::All };
                let mut buf = AlignedVec::new();
                encode_bytes(&mut buf, &source, &event, &data, 2, kind, 200).unwrap();
                let want = match flag {
                    0 => Ext::None,
                    FLAG_ORIGIN_HOST => Ext::OriginHost(&value),
                    _ => Ext::UniqueHash(&value),
                };
                if want != Ext::None {
                    set_ext(&mut buf, want);
                }
                let d = decode(&buf, 4, true, 200).unwrap();
                prop_assert_eq!((d.event.source, d.event.event, d.event.data), (&*source, &*event, &data[..]));
                prop_assert_eq!(d.event.ext, want);
                prop_assert_eq!(d.kind, kind);
                let mut bad = buf.to_vec();
                bad[at] = byte;
                if let Ok(d) = decode(&bad, 4, true, 200) {
                    prop_assert_eq!((d.event.source, d.event.event, d.event.data), (&*source, &*event, &data[..]));
                }
            }
        }
    }
}
