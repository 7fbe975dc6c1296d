//! Subscriptions: three-level matching and panic-isolated callbacks.
//!
//! Matching costs at most three hash lookups per event, with a small multiplicative hash
//! (the FxHash function): `("*","*")` callbacks sit in a plain list, and one lookup of the
//! source gives both its `(source,"*")` list and its per-event table. The keys are only the
//! names this process subscribed to, so names chosen by other processes cannot degrade the
//! tables (they are looked up, never inserted).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::event::Event;

/// A subscription callback.
pub(crate) type Callback = Box<dyn FnMut(&Event<'_>) + Send + 'static>;

/// Identifier returned by [`crate::worker::Worker::subscribe`].
///
/// # Examples
///
/// ```
/// use worker_events::{Events, Options, Wid};
/// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
/// let mut w = events.init_worker(Wid::Worker(0)).unwrap();
/// let id = w.subscribe("*", "*", |_| {});
/// assert!(w.unsubscribe(id));
/// assert!(!w.unsubscribe(id));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub(crate) u64);

/// The FxHash function (rustc's): fast on short strings, fine for keys this process chose.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
type List = Vec<(u64, Callback)>;

/// The subscriptions of one source name.
#[derive(Default)]
struct BySource {
    /// `(source, "*")`, in subscription order.
    any: List,
    /// `(source, event)` by event name, each in subscription order.
    events: FxMap<Box<str>, List>,
}

#[derive(Default)]
pub(crate) struct Subscriptions {
    next: u64,
    /// `("*", "*")`, in subscription order.
    wild: List,
    /// Every other subscription, by source name.
    table: FxMap<Box<str>, BySource>,
    index: HashMap<u64, (Box<str>, Box<str>)>,
}

/// Outcome of running the callbacks for one event.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RunStats {
    pub called: u64,
    pub panicked: u64,
}

impl Subscriptions {
    pub(crate) fn subscribe(&mut self, source: &str, event: &str, cb: Callback) -> SubscriptionId {
        self.next += 1;
        let id = self.next;
        match (source, event) {
            ("*", "*") => self.wild.push((id, cb)),
            (s, "*") => self.table.entry(s.into()).or_default().any.push((id, cb)),
            (s, e) => self.table.entry(s.into()).or_default().events.entry(e.into()).or_default().push((id, cb)),
        }
        self.index.insert(id, (source.into(), event.into()));
        SubscriptionId(id)
    }

    pub(crate) fn unsubscribe(&mut self, id: SubscriptionId) -> bool {
        let Some((s, e)) = self.index.remove(&id.0) else { return false };
        let keep = |(i, _): &(u64, Callback)| *i != id.0;
        if (&*s, &*e) == ("*", "*") {
            self.wild.retain(keep);
            return true;
        }
        if let Some(by) = self.table.get_mut(&s) {
            if &*e == "*" {
                by.any.retain(keep);
            } else if let Some(list) = by.events.get_mut(&e) {
                list.retain(keep);
                if list.is_empty() {
                    by.events.remove(&e);
                }
            }
            if by.any.is_empty() && by.events.is_empty() {
                self.table.remove(&s);
            }
        }
        true
    }

    /// Run the callbacks for `ev`: `("*","*")`, then `(source,"*")`, then `(source,event)`,
    /// each level in subscription order. A level identical to an earlier one (an event
    /// whose source or name is literally `"*"`) is not run twice. A panicking callback is
    /// caught and logged; the others still run.
    pub(crate) fn run(&mut self, ev: &Event<'_>) -> RunStats {
        let mut st = RunStats::default();
        run_list(&mut self.wild, ev, &mut st);
        let (source, event) = (ev.source(), ev.event());
        if let Some(by) = self.table.get_mut(source) {
            if source != "*" {
                run_list(&mut by.any, ev, &mut st);
            }
            if event != "*" {
                if let Some(list) = by.events.get_mut(event) {
                    run_list(list, ev, &mut st);
                }
            }
        }
        st
    }
}

fn run_list(list: &mut List, ev: &Event<'_>, st: &mut RunStats) {
    for (id, cb) in list.iter_mut() {
        st.called += 1;
        if catch_unwind(AssertUnwindSafe(|| cb(ev))).is_err() {
            st.panicked += 1;
            tracing::error!(subscription = *id, source = ev.source(), event = ev.event(), "event callback panicked");
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn ev<'a>(source: &'a str, event: &'a str) -> Event<'a> {
        Event { source, event, data: &[], wid: None }
    }

    #[test]
    fn levels_run_in_order_once_each_even_for_literal_stars() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut subs = Subscriptions::default();
        let mut ids = Vec::new();
        for (s, e) in [("a", "x"), ("*", "*"), ("a", "*"), ("*", "x"), ("a", "x")] {
            let l = log.clone();
            let tag = format!("{s}/{e}#{}", ids.len());
            ids.push(subs.subscribe(s, e, Box::new(move |_| l.lock().unwrap().push(tag.clone()))));
        }
        let run = |subs: &mut Subscriptions, s: &str, e: &str| {
            log.lock().unwrap().clear();
            subs.run(&ev(s, e));
            log.lock().unwrap().clone()
        };
        assert_eq!(run(&mut subs, "a", "x"), ["*/*#1", "a/*#2", "a/x#0", "a/x#4"]);
        assert_eq!(run(&mut subs, "a", "*"), ["*/*#1", "a/*#2"]);
        assert_eq!(run(&mut subs, "*", "x"), ["*/*#1", "*/x#3"]);
        assert_eq!(run(&mut subs, "*", "*"), ["*/*#1"]);
        assert_eq!(run(&mut subs, "b", "x"), ["*/*#1"]);
        assert!(subs.unsubscribe(ids[0]) && subs.unsubscribe(ids[1]) && !subs.unsubscribe(ids[1]));
        assert_eq!(run(&mut subs, "a", "x"), ["a/*#2", "a/x#4"]);
        assert!(subs.unsubscribe(ids[2]) && subs.unsubscribe(ids[4]) && subs.unsubscribe(ids[3]));
        assert!(subs.table.is_empty() && subs.wild.is_empty(), "empty entries are removed");
    }
}
