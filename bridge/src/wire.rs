//! The stream's message format: headers for the origin host, the sequence number and the
//! event's names; the data as the payload.
//!
//! | header      | value                                                            |
//! |-------------|------------------------------------------------------------------|
//! | `WE-Origin` | the exporting host id                                            |
//! | `WE-Seq`    | the per-origin sequence number (decimal, from 1)                 |
//! | `WE-Gap`    | only on a gap marker: how many numbers (ending at `WE-Seq`) were lost |
//! | `WE-Source` | the event's source, `%XX`-escaped outside printable ASCII and `%` |
//! | `WE-Event`  | the event's name, escaped the same way                           |
//! | `Nats-Msg-Id` | `<origin>:<seq>`: JetStream drops a resent copy within its duplicate window |

use async_nats::HeaderMap;

pub(crate) const ORIGIN: &str = "WE-Origin";
pub(crate) const SEQ: &str = "WE-Seq";
pub(crate) const GAP: &str = "WE-Gap";
pub(crate) const SOURCE: &str = "WE-Source";
pub(crate) const EVENT: &str = "WE-Event";

/// Escape a name for a header value.
pub(crate) fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// Undo [`escape`]; `None` for a malformed value.
pub(crate) fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut o = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            o.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            o.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(o).ok()
}

/// The headers of an event (`gap == None`) or a gap marker.
pub(crate) fn headers(origin: &str, seq: u64, gap: Option<u64>, source: &str, event: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ORIGIN, origin);
    h.insert(SEQ, seq.to_string().as_str());
    h.insert("Nats-Msg-Id", format!("{origin}:{seq}").as_str());
    match gap {
        Some(n) => h.insert(GAP, n.to_string().as_str()),
        None => {
            h.insert(SOURCE, escape(source).as_str());
            h.insert(EVENT, escape(event).as_str());
        }
    }
    h
}

/// A decoded message header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) origin: String,
    pub(crate) seq: u64,
    /// `Some(n)`: a gap marker.
    pub(crate) gap: Option<u64>,
    pub(crate) source: String,
    pub(crate) event: String,
}

/// Decode the headers; `None` when something is missing or malformed.
pub(crate) fn parse(h: Option<&HeaderMap>) -> Option<Meta> {
    let h = h?;
    let get = |k: &str| h.get(k).map(|v| v.as_str().to_string());
    let origin = get(ORIGIN)?;
    let seq = get(SEQ)?.parse().ok()?;
    let gap = match get(GAP) {
        Some(g) => Some(g.parse().ok()?),
        None => None,
    };
    let (source, event) = if gap.is_some() {
        (String::new(), String::new())
    } else {
        (unescape(&get(SOURCE)?)?, unescape(&get(EVENT)?)?)
    };
    Some(Meta { origin, seq, gap, source, event })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for s in ["cache", "a b%c", "é\r\n:x", ""] {
            assert_eq!(unescape(&escape(s)).as_deref(), Some(s));
        }
        assert_eq!(unescape("%G0"), None);
        assert_eq!(unescape("%4"), None);
        let h = headers("h1", 42, None, "s\n", "e");
        let m = parse(Some(&h)).unwrap();
        assert_eq!(
            (m.origin.as_str(), m.seq, m.gap, m.source.as_str(), m.event.as_str()),
            ("h1", 42, None, "s\n", "e")
        );
        let g = parse(Some(&headers("h1", 50, Some(8), "", ""))).unwrap();
        assert_eq!(g.gap, Some(8));
        assert_eq!(parse(None), None);
        assert_eq!(parse(Some(&HeaderMap::new())), None);
    }
}
