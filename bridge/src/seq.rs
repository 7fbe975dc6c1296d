//! The import side's per-origin sequence numbers: gap detection, duplicate detection, and
//! the state file that keeps them across a bridge restart.
//!
//! Every message an exporting bridge puts into the stream carries its origin host and a
//! sequence number: consecutive per origin, starting at 1. An event covers one number; a
//! gap marker (events the origin dropped or missed) covers the numbers up to its own.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What to do with an incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Deliver it (an event) or not (a gap marker), after a `lost` notice for `lost`
    /// numbers when non-zero.
    Accept { lost: u64 },
    /// Already delivered (a redelivery or a resent publish): ack and skip.
    Duplicate,
}

/// Last sequence number delivered per origin host, optionally persisted.
#[derive(Debug)]
pub(crate) struct Tracker {
    last: BTreeMap<String, u64>,
    file: Option<File>,
    buf: String,
}

impl Tracker {
    /// A tracker that persists to `path` (loaded if it exists).
    pub(crate) fn open(path: &Path) -> io::Result<Tracker> {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let mut last = BTreeMap::new();
        for line in text.lines() {
            if let Some((origin, seq)) = line.split_once(' ')
                && let Ok(seq) = seq.trim().parse::<u64>()
            {
                last.insert(origin.to_string(), seq);
            }
        }
        Ok(Tracker { last, file: Some(file), buf: String::new() })
    }

    /// A tracker kept in memory only.
    #[cfg(test)]
    pub(crate) fn in_memory() -> Tracker {
        Tracker { last: BTreeMap::new(), file: None, buf: String::new() }
    }

    /// The verdict for a message of `origin` with sequence `seq`; `gap` is `Some(count)` for
    /// a gap marker. An origin never seen before starts here (nothing before it is lost,
    /// except what a gap marker says).
    pub(crate) fn check(&self, origin: &str, seq: u64, gap: Option<u64>) -> Verdict {
        match self.last.get(origin) {
            None => Verdict::Accept { lost: gap.unwrap_or(0) },
            Some(&last) if seq <= last => Verdict::Duplicate,
            Some(&last) => Verdict::Accept { lost: seq - last - u64::from(gap.is_none()) },
        }
    }

    /// Record that `seq` of `origin` was handled (after the local publish, before the ack).
    pub(crate) fn commit(&mut self, origin: &str, seq: u64) -> io::Result<()> {
        match self.last.get_mut(origin) {
            Some(l) => *l = seq,
            None => {
                self.last.insert(origin.to_string(), seq);
            }
        }
        let Some(file) = &self.file else { return Ok(()) };
        // Fixed-width numbers: the file never shrinks while the set of origins is the same,
        // so one positioned write replaces it (no truncate, no temp file). A process kill
        // cannot tear it (the page cache keeps the write); a machine crash can, and then
        // the tracker starts again from the first message per origin.
        self.buf.clear();
        for (o, s) in &self.last {
            self.buf.push_str(&format!("{o} {s:020}\n"));
        }
        file.write_all_at(self.buf.as_bytes(), 0)
    }

    /// The last handled sequence of `origin`.
    #[cfg(test)]
    pub(crate) fn last(&self, origin: &str) -> Option<u64> {
        self.last.get(origin).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_duplicates_and_markers() {
        let mut t = Tracker::in_memory();
        assert_eq!(t.check("a", 7, None), Verdict::Accept { lost: 0 });
        t.commit("a", 7).unwrap();
        assert_eq!(t.check("a", 8, None), Verdict::Accept { lost: 0 });
        assert_eq!(t.check("a", 7, None), Verdict::Duplicate);
        assert_eq!(t.check("a", 3, None), Verdict::Duplicate);
        assert_eq!(t.check("a", 10, None), Verdict::Accept { lost: 2 });
        // A gap marker covering 8..=12 (5 numbers).
        assert_eq!(t.check("a", 12, Some(5)), Verdict::Accept { lost: 5 });
        assert_eq!(t.check("b", 4, Some(4)), Verdict::Accept { lost: 4 });
        assert_eq!(t.last("a"), Some(7));
    }

    #[test]
    fn state_file_survives_a_restart() {
        let dir = worker_events_dev_support::TempDir::new("bridge-seq");
        let p = dir.join("state");
        {
            let mut t = Tracker::open(&p).unwrap();
            t.commit("host-b", 5).unwrap();
            t.commit("host-a", 1).unwrap();
            t.commit("host-a", 123).unwrap();
        }
        let t = Tracker::open(&p).unwrap();
        assert_eq!(t.last("host-a"), Some(123));
        assert_eq!(t.last("host-b"), Some(5));
        assert_eq!(t.check("host-a", 123, None), Verdict::Duplicate);
    }
}
