//! The privileged agent's unique-diversion patterns (`Worker::divert_unique`): which
//! `(source, event)` pairs of `Target::Unique` events go to the agent instead of being routed
//! on this host. Each side is exact, `"*"` (anything) or a prefix ending in `*`
//! (`"refresh*"`). The list travels in DIVERT control frames (`control/protocol.rs`) as
//! `count u16`, then per pattern `source_len u8, source, event_len u8, event`; every parse
//! treats the bytes as hostile.

/// Most patterns one list holds.
pub(crate) const MAX_PATTERNS: usize = 256;
/// Longest side of a pattern, in bytes.
pub(crate) const MAX_PATTERN_LEN: usize = 255;

/// One side of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Any,
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
}

impl Part {
    fn new(s: &[u8]) -> Part {
        match s {
            b"*" => Part::Any,
            [head @ .., b'*'] => Part::Prefix(head.into()),
            _ => Part::Exact(s.into()),
        }
    }

    fn matches(&self, name: &[u8]) -> bool {
        match self {
            Part::Any => true,
            Part::Exact(e) => **e == *name,
            Part::Prefix(p) => name.starts_with(p),
        }
    }
}

/// A validated pattern list and its encoding (empty: divert nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Patterns {
    list: Vec<(Part, Part)>,
    encoded: Vec<u8>,
}

impl Patterns {
    /// Check and encode `pairs`: at most [`MAX_PATTERNS`], each side 1..=[`MAX_PATTERN_LEN`]
    /// bytes.
    pub(crate) fn new(pairs: &[(&str, &str)]) -> Result<Patterns, String> {
        if pairs.len() > MAX_PATTERNS {
            return Err(format!("{} patterns, at most {MAX_PATTERNS}", pairs.len()));
        }
        let mut encoded = Vec::new();
        encoded.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
        for (s, e) in pairs {
            for side in [s, e] {
                if side.is_empty() || side.len() > MAX_PATTERN_LEN {
                    return Err(format!("pattern {side:?}: 1..={MAX_PATTERN_LEN} bytes"));
                }
                encoded.push(side.len() as u8);
                encoded.extend_from_slice(side.as_bytes());
            }
        }
        Patterns::decode(&encoded)
    }

    /// Parse an encoded list (a DIVERT frame's body).
    pub(crate) fn decode(body: &[u8]) -> Result<Patterns, String> {
        let (count, mut rest) = match body {
            [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, rest),
            _ => return Err("pattern list shorter than its count".into()),
        };
        if count > MAX_PATTERNS {
            return Err(format!("{count} patterns, at most {MAX_PATTERNS}"));
        }
        let mut side = || -> Result<Part, String> {
            let (&len, tail) = rest.split_first().ok_or("pattern list truncated")?;
            let len = len as usize;
            if len == 0 || tail.len() < len {
                return Err(format!("pattern of {len} bytes, {} left", tail.len()));
            }
            let (name, tail) = tail.split_at(len);
            std::str::from_utf8(name).map_err(|_| "pattern not UTF-8".to_string())?;
            rest = tail;
            Ok(Part::new(name))
        };
        let mut list = Vec::with_capacity(count);
        for _ in 0..count {
            let s = side()?;
            let e = side()?;
            list.push((s, e));
        }
        if !rest.is_empty() {
            return Err(format!("{} bytes after the pattern list", rest.len()));
        }
        Ok(Patterns { list, encoded: body.to_vec() })
    }

    /// The encoding ([`Patterns::decode`] reads it back).
    pub(crate) fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Does a unique event named `(source, event)` match a pattern?
    pub(crate) fn matches(&self, source: &[u8], event: &[u8]) -> bool {
        self.list.iter().any(|(s, e)| s.matches(source) && e.matches(event))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn exact_any_and_prefix() {
        let p = Patterns::new(&[("cache", "refresh*"), ("*", "purge"), ("cfg*", "*")]).unwrap();
        assert!(p.matches(b"cache", b"refresh"));
        assert!(p.matches(b"cache", b"refresh-all"));
        assert!(!p.matches(b"cache", b"refres"));
        assert!(!p.matches(b"cache2", b"refresh"));
        assert!(p.matches(b"anything", b"purge"));
        assert!(!p.matches(b"anything", b"purged"));
        assert!(p.matches(b"cfg", b"x") && p.matches(b"cfg.v2", b"y"));
        assert!(!p.matches(b"cf", b"x"));
        assert!(Patterns::default().is_empty() && !Patterns::default().matches(b"a", b"b"));
        assert_eq!(Patterns::decode(p.encoded()).unwrap(), p);
        assert!(Patterns::new(&[]).unwrap().is_empty());
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(Patterns::new(&[("", "e")]).is_err());
        assert!(Patterns::new(&[("s", &"e".repeat(256))]).is_err());
        let many: Vec<(&str, &str)> = vec![("s", "e"); MAX_PATTERNS + 1];
        assert!(Patterns::new(&many).is_err());
        let good = Patterns::new(&[("s", "e")]).unwrap().encoded().to_vec();
        assert!(Patterns::decode(&good[..good.len() - 1]).is_err(), "truncated");
        assert!(Patterns::decode(&[good.clone(), vec![0]].concat()).is_err(), "trailing bytes");
        assert!(Patterns::decode(&[1]).is_err(), "no count");
        assert!(Patterns::decode(&[1, 0, 1, 0xff, 1, b'e']).is_err(), "not UTF-8");
        assert!(Patterns::decode(&[1, 0, 0, 1, b'e']).is_err(), "empty side");
        assert!(Patterns::decode(&(MAX_PATTERNS as u16 + 1).to_le_bytes()).is_err(), "count over the bound");
    }
}
