//! The public value types: [`Wid`], [`Target`], [`Event`], the `lost` notice, and the
//! message format they travel in.

use std::fmt;

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;

use crate::error::{Error, PublishError};

/// Identity of a participating process.
///
/// # Examples
///
/// ```
/// use worker_events::Wid;
/// assert_eq!(Wid::Worker(3).to_string(), "worker 3");
/// assert_eq!(Wid::PrivilegedAgent.to_string(), "privileged agent");
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Wid {
    /// Worker slot `n`, `0..workers`.
    Worker(u32),
    /// The privileged agent (needs `enable_privileged_agent(true)`).
    PrivilegedAgent,
}

impl fmt::Display for Wid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wid::Worker(n) => write!(f, "worker {n}"),
            Wid::PrivilegedAgent => f.write_str("privileged agent"),
        }
    }
}

/// Where an event goes.
///
/// # Examples
///
/// ```
/// use worker_events::Target;
/// let t = Target::Unique("purge:k1");
/// assert!(matches!(t, Target::Unique(h) if h == "purge:k1"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target<'a> {
    /// Every worker, the publisher included, and the privileged agent when enabled.
    All,
    /// Only the publishing process; never crosses a process boundary.
    Current,
    /// Exactly one live worker; further events with the same hash within
    /// `unique_timeout` are dropped.
    Unique(&'a str),
}

/// Reserved source of the events this crate emits itself.
pub const SYSTEM_SOURCE: &str = "worker-events";
/// Longest accepted unique hash, in bytes.
pub const MAX_UNIQUE_HASH_LEN: usize = 256;

/// Data of the `("worker-events", "lost")` notice: `count` events from `publisher` could not
/// be delivered to this process (a queue overflowed, or a partial message from a crashed
/// publisher was discarded). Resynchronize whatever state those events maintain.
///
/// # Examples
///
/// ```
/// use worker_events::{Lost, Wid};
/// let l = Lost { count: 3, publisher: Wid::Worker(1) };
/// assert_eq!(l.count, 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Lost {
    /// How many events were lost.
    pub count: u64,
    /// Who published them.
    pub publisher: Wid,
}

/// Data of the `("worker-events", "broker")` notice: a new broker was elected after this
/// worker had been attached to a previous one (a failover). Every worker that was attached
/// gets it once per failover, when it has re-attached to the new broker (the new broker
/// itself when it takes over); the event's [`Event::wid`] is the new broker too. Unique
/// events this worker published meanwhile are resent to the new broker.
///
/// # Examples
///
/// ```
/// use worker_events::{NewBroker, Wid};
/// let b = NewBroker { broker: Wid::Worker(2), epoch: 7 };
/// assert_eq!((b.broker, b.epoch), (Wid::Worker(2), 7));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NewBroker {
    /// The worker that now serves the control socket.
    pub broker: Wid,
    /// Its election epoch (one more at every election; a fencing token: a broker that
    /// finds a newer epoch in shared memory steps down).
    pub epoch: u64,
}

/// A value that can be published with [`crate::Worker::publish`]: anything rkyv can
/// serialize (derive `rkyv::Archive` and `rkyv::Serialize`).
pub trait Payload: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>> {}
impl<T> Payload for T where T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>> {}

/// One delivered event, borrowed for the duration of a callback.
///
/// The data was copied out of shared memory before the callback runs; typed access
/// validates it (rkyv `bytecheck`), so a corrupt or hostile payload is an `Err`, never UB.
///
/// # Examples
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use worker_events::{Events, Options, Target, Wid};
/// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
/// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let s = seen.clone();
/// w.subscribe("cfg", "*", move |ev| {
///     let n: u64 = ev.deserialize().unwrap();
///     s.lock().unwrap().push((ev.source().to_string(), ev.event().to_string(), n, ev.wid()));
/// });
/// w.publish(Target::All, "cfg", "version", &42u64).unwrap();
/// assert_eq!(*seen.lock().unwrap(), vec![("cfg".into(), "version".into(), 42, None)]);
/// ```
#[derive(Clone, Copy)]
pub struct Event<'a> {
    pub(crate) source: &'a str,
    pub(crate) event: &'a str,
    pub(crate) data: &'a [u8],
    pub(crate) wid: Option<Wid>,
}

impl<'a> Event<'a> {
    /// The source given to `publish`.
    pub fn source(&self) -> &'a str {
        self.source
    }
    /// The event name given to `publish`.
    pub fn event(&self) -> &'a str {
        self.event
    }
    /// The originating process; `None` for `Target::Current` events and in testing mode.
    pub fn wid(&self) -> Option<Wid> {
        self.wid
    }
    /// The raw data bytes (what `publish_bytes` sent, or the rkyv bytes of a typed value).
    /// 16-byte aligned.
    pub fn data_bytes(&self) -> &'a [u8] {
        self.data
    }
    /// Validated zero-copy access to a typed payload.
    ///
    /// # Errors
    /// [`Error::Decode`] when the bytes are not a valid archive of `T`.
    pub fn data<T>(&self) -> Result<&'a T::Archived, Error>
    where
        T: rkyv::Archive,
        T::Archived: for<'b> rkyv::bytecheck::CheckBytes<HighValidator<'b, rancor::Error>>,
    {
        rkyv::access::<T::Archived, rancor::Error>(self.data).map_err(|e| Error::Decode(e.to_string()))
    }
    /// Validate and deserialize a typed payload.
    ///
    /// # Errors
    /// [`Error::Decode`] when the bytes are not a valid archive of `T`.
    pub fn deserialize<T>(&self) -> Result<T, Error>
    where
        T: rkyv::Archive,
        T::Archived: for<'b> rkyv::bytecheck::CheckBytes<HighValidator<'b, rancor::Error>>
            + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
    {
        let archived = self.data::<T>()?;
        rkyv::deserialize::<T, rancor::Error>(archived).map_err(|e| Error::Decode(e.to_string()))
    }
    /// For a `("worker-events", "lost")` notice, its contents.
    pub fn lost(&self) -> Option<Lost> {
        if self.source == SYSTEM_SOURCE && self.event == "lost" { self.deserialize::<Lost>().ok() } else { None }
    }
    /// For a `("worker-events", "broker")` notice (a new broker was elected), its contents.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Target, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// w.subscribe("worker-events", "broker", |ev| {
    ///     let b = ev.new_broker().unwrap();
    ///     println!("{} is the broker now (epoch {})", b.broker, b.epoch);
    /// });
    /// ```
    pub fn new_broker(&self) -> Option<NewBroker> {
        if self.source == SYSTEM_SOURCE && self.event == "broker" { self.deserialize::<NewBroker>().ok() } else { None }
    }
}

impl fmt::Debug for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("source", &self.source)
            .field("event", &self.event)
            .field("wid", &self.wid)
            .field("data_len", &self.data.len())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// Message format (see shm-layout.md): 16-byte header, data (16-aligned), source, event.

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

/// Encode a typed message into `buf` (rkyv, serialized once for every receiver).
pub(crate) fn encode_typed<T: Payload>(
    buf: &mut AlignedVec,
    source: &str,
    event: &str,
    value: &T,
    origin: u32,
    kind: Kind,
    max_payload_len: usize,
) -> Result<(), PublishError> {
    begin(buf);
    let taken = std::mem::take(buf);
    match rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, taken) {
        Ok(b) => *buf = b,
        Err(e) => return Err(PublishError::Serialize(e.to_string())),
    }
    finish(buf, source, event, origin, kind, max_payload_len)
}

/// A decoded message header, all lengths checked against the buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decoded<'a> {
    pub event: Event<'a>,
    pub kind: u8,
}

/// Why a received message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// Decode a message received from another process. Nothing in it is trusted.
pub(crate) fn decode(buf: &[u8], workers: u32, agent: bool, max_payload_len: usize) -> Result<Decoded<'_>, Malformed> {
    if buf.len() < MSG_HDR {
        return Err(Malformed);
    }
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    let u16_at = |i: usize| u16::from_le_bytes(buf[i..i + 2].try_into().expect("2 bytes")) as usize;
    let data_len = u32_at(0) as usize;
    let (src_len, ev_len) = (u16_at(4), u16_at(6));
    let origin = u32_at(8);
    let kind = buf[12];
    if data_len > max_payload_len || MSG_HDR + data_len + src_len + ev_len != buf.len() || kind > Kind::System as u8 {
        return Err(Malformed);
    }
    let data = &buf[MSG_HDR..MSG_HDR + data_len];
    let src_start = MSG_HDR + data_len;
    let source = std::str::from_utf8(&buf[src_start..src_start + src_len]).map_err(|_| Malformed)?;
    let event = std::str::from_utf8(&buf[src_start + src_len..]).map_err(|_| Malformed)?;
    let wid = match origin {
        ORIGIN_NONE => None,
        o if o < workers => Some(Wid::Worker(o)),
        o if agent && o == workers => Some(Wid::PrivilegedAgent),
        _ => return Err(Malformed),
    };
    Ok(Decoded { event: Event { source, event, data, wid }, kind })
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
