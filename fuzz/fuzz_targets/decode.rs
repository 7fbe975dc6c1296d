//! Event message decode: arbitrary bytes as a message copied out of a ring or received in a
//! UNIQUE frame. `decode` must accept or refuse without panicking; an accepted message must
//! be consistent with its header, and typed access (rkyv validation) to its data must be an
//! `Ok` or an `Err`, for any type, never a panic or an out-of-bounds read.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use worker_events::fuzz_api::{MESSAGE_HEADER_SIZE, decode};
use worker_events::{Event, Lost, MAX_PAYLOAD_LIMIT, MAX_WORKERS, SYSTEM_SOURCE, Wid};

#[derive(Arbitrary, Debug)]
struct Input {
    workers: u8,
    agent: bool,
    max_payload: u32,
    /// Decode at an odd address (the library always decodes from a 16-aligned buffer; a
    /// misaligned one must still be safe, rkyv refusing what it cannot read).
    misaligned: bool,
    msg: Msg,
}

#[derive(Arbitrary, Debug)]
enum Msg {
    /// Arbitrary bytes.
    Raw(Vec<u8>),
    /// A well-formed message around a real rkyv payload, then damaged in places: reaches
    /// the typed accessors far more often than raw bytes do.
    Built {
        origin: u32,
        kind: u8,
        lost_notice: bool,
        source: String,
        event: String,
        payload: Payload,
        /// (offset, xor) applied to the whole message, header included.
        flips: Vec<(u16, u8)>,
    },
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Bytes(Vec<u8>),
    U64(u64),
    Str(String),
    Lost { count: u64, worker: Option<u32> },
    Nested { name: String, ids: Vec<u32>, peer: Option<u32>, pairs: Vec<(u64, String)> },
}

fn wid(w: Option<u32>) -> Wid {
    w.map_or(Wid::PrivilegedAgent, Wid::Worker)
}

fn build(origin: u32, kind: u8, source: &str, event: &str, payload: &Payload) -> Vec<u8> {
    type E = rkyv::rancor::Error;
    let data = match payload {
        Payload::Bytes(b) => b.clone(),
        Payload::U64(v) => rkyv::to_bytes::<E>(v).unwrap().to_vec(),
        Payload::Str(s) => rkyv::to_bytes::<E>(s).unwrap().to_vec(),
        Payload::Lost { count, worker } => {
            rkyv::to_bytes::<E>(&Lost { count: *count, publisher: wid(*worker) }).unwrap().to_vec()
        }
        Payload::Nested { name, ids, peer, pairs } => {
            let n = Nested { name: name.clone(), ids: ids.clone(), peer: peer.map(Wid::Worker), pairs: pairs.clone() };
            rkyv::to_bytes::<E>(&n).unwrap().to_vec()
        }
    };
    let mut m = Vec::with_capacity(MESSAGE_HEADER_SIZE + data.len() + source.len() + event.len());
    m.extend_from_slice(&(data.len() as u32).to_le_bytes());
    m.extend_from_slice(&(source.len() as u16).to_le_bytes());
    m.extend_from_slice(&(event.len() as u16).to_le_bytes());
    m.extend_from_slice(&origin.to_le_bytes());
    m.extend_from_slice(&[kind, 0, 0, 0]);
    m.extend_from_slice(&data);
    m.extend_from_slice(source.as_bytes());
    m.extend_from_slice(event.as_bytes());
    m
}

/// A few payload types, nested and variable-length ones included.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
struct Nested {
    name: String,
    ids: Vec<u32>,
    peer: Option<Wid>,
    pairs: Vec<(u64, String)>,
}

fn typed_access(ev: &Event<'_>) {
    let _ = ev.data::<u64>().map(|v| v.to_native());
    let _ = ev.data::<String>().map(|s| s.as_str().len());
    let _ = ev.data::<Vec<u8>>().map(|v| v.iter().map(|&b| u64::from(b)).sum::<u64>());
    let _ = ev.data::<Lost>();
    let _ = ev.data::<Nested>().map(|n| (n.name.len(), n.ids.len(), n.pairs.len()));
    let _ = ev.deserialize::<String>();
    let _ = ev.deserialize::<Vec<Wid>>();
    let _ = ev.deserialize::<Nested>();
    let _ = ev.lost();
}

fuzz_target!(|input: Input| {
    let workers = u32::from(input.workers) % (MAX_WORKERS + 1);
    let max_payload = input.max_payload as usize % (MAX_PAYLOAD_LIMIT + 1);

    let msg = match &input.msg {
        Msg::Raw(b) => b.clone(),
        Msg::Built { origin, kind, lost_notice, source, event, payload, flips } => {
            let (source, event) = if *lost_notice { (SYSTEM_SOURCE, "lost") } else { (&source[..], &event[..]) };
            let origin = if workers > 0 && *origin != u32::MAX { origin % (workers + 1) } else { *origin };
            let mut m = build(origin, kind % 4, source, event, payload);
            for &(off, x) in flips.iter().take(16) {
                let n = m.len();
                if n > 0 {
                    m[off as usize % n] ^= x;
                }
            }
            m
        }
    };

    // A 16-aligned private copy, as the library makes before decoding (or one byte off).
    let shift = usize::from(input.misaligned);
    let mut words = vec![0u128; (msg.len() + shift).div_ceil(16)];
    // SAFETY: `words` holds at least msg.len() + shift bytes, any byte pattern is a valid
    // u128, and the view is the only access to `words` while it lives.
    let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 16) };
    let buf = &mut bytes[shift..shift + msg.len()];
    buf.copy_from_slice(&msg);

    let Some((ev, kind)) = decode(buf, workers, input.agent, max_payload) else { return };

    // Accepted: the header's lengths add up and every field is within the message.
    let data_len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    assert!(data_len <= max_payload);
    assert_eq!(ev.data_bytes().len(), data_len);
    assert_eq!(ev.data_bytes(), &buf[MESSAGE_HEADER_SIZE..MESSAGE_HEADER_SIZE + data_len]);
    assert_eq!(MESSAGE_HEADER_SIZE + data_len + ev.source().len() + ev.event().len(), buf.len());
    assert_eq!(kind, buf[12]);
    assert!(kind <= 3, "unknown kind {kind} accepted");
    match ev.wid() {
        None => assert_eq!(u32::from_le_bytes(buf[8..12].try_into().unwrap()), u32::MAX),
        Some(Wid::Worker(n)) => assert!(n < workers),
        Some(Wid::PrivilegedAgent) => assert!(input.agent),
    }
    if ev.lost().is_some() {
        assert_eq!((ev.source(), ev.event()), (SYSTEM_SOURCE, "lost"));
    }
    let _ = format!("{ev:?}");
    typed_access(&ev);
});
