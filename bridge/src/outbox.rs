//! The export side's bounded buffer: events accepted from the local bus, in order, waiting
//! for JetStream. A full buffer turns events into a gap (a count), and so does a local
//! `lost` notice: gaps still consume sequence numbers, so receivers see them.

use std::collections::VecDeque;

use bytes::Bytes;

/// One entry of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    /// An event to export.
    Event { source: String, event: String, data: Bytes },
    /// `n` sequence numbers whose events were dropped (buffer full) or missed locally.
    Gap(u64),
}

impl Item {
    /// How many sequence numbers this item consumes.
    pub(crate) fn width(&self) -> u64 {
        match self {
            Item::Event { .. } => 1,
            Item::Gap(n) => *n,
        }
    }
}

/// A FIFO of at most `cap` events; gaps merge with a gap at the tail and do not count
/// against the bound (so there is at most one gap between two events).
#[derive(Debug)]
pub(crate) struct Outbox {
    items: VecDeque<Item>,
    events: usize,
    cap: usize,
}

impl Outbox {
    pub(crate) fn new(cap: usize) -> Outbox {
        Outbox { items: VecDeque::new(), events: 0, cap: cap.max(1) }
    }

    /// Queue an event; `false` when the buffer is full (the event became a gap).
    pub(crate) fn push_event(&mut self, source: &str, event: &str, data: &[u8]) -> bool {
        if self.events >= self.cap {
            self.push_gap(1);
            return false;
        }
        self.events += 1;
        self.items.push_back(Item::Event {
            source: source.to_string(),
            event: event.to_string(),
            data: Bytes::copy_from_slice(data),
        });
        true
    }

    /// Queue a gap of `n` sequence numbers.
    pub(crate) fn push_gap(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(Item::Gap(g)) = self.items.back_mut() {
            *g += n;
        } else {
            self.items.push_back(Item::Gap(n));
        }
    }

    /// Take the oldest item.
    pub(crate) fn pop(&mut self) -> Option<Item> {
        let it = self.items.pop_front()?;
        if let Item::Event { .. } = it {
            self.events -= 1;
        }
        Some(it)
    }

    /// Events held.
    pub(crate) fn len(&self) -> usize {
        self.events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_turns_into_one_gap_and_order_is_kept() {
        let mut o = Outbox::new(2);
        assert!(o.push_event("s", "1", b"a"));
        assert!(o.push_event("s", "2", b"b"));
        assert!(!o.push_event("s", "3", b"c"));
        assert!(!o.push_event("s", "4", b"d"));
        o.push_gap(5);
        assert_eq!(o.len(), 2);
        assert!(matches!(o.pop(), Some(Item::Event { ref event, .. }) if event == "1"));
        assert!(o.push_event("s", "5", b"e"), "room again after a pop");
        assert!(matches!(o.pop(), Some(Item::Event { ref event, .. }) if event == "2"));
        assert_eq!(o.pop(), Some(Item::Gap(7)));
        assert_eq!(o.pop().map(|i| i.width()), Some(1));
        assert_eq!(o.pop(), None);
        o.push_gap(0);
        assert_eq!(o.pop(), None);
    }
}
