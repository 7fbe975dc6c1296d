//! Subscriptions: three-level matching and panic-isolated callbacks.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::event::Event;

/// A subscription callback.
pub(crate) type Callback = Box<dyn FnMut(&Event<'_>) + Send + 'static>;

/// Identifier returned by [`crate::Worker::subscribe`].
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

#[derive(Default)]
pub(crate) struct Subscriptions {
    next: u64,
    /// source -> event -> callbacks in subscription order.
    table: HashMap<String, HashMap<String, Vec<(u64, Callback)>>>,
    index: HashMap<u64, (String, String)>,
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
        self.table.entry(source.to_string()).or_default().entry(event.to_string()).or_default().push((id, cb));
        self.index.insert(id, (source.to_string(), event.to_string()));
        SubscriptionId(id)
    }

    pub(crate) fn unsubscribe(&mut self, id: SubscriptionId) -> bool {
        let Some((s, e)) = self.index.remove(&id.0) else { return false };
        if let Some(events) = self.table.get_mut(&s) {
            if let Some(list) = events.get_mut(&e) {
                list.retain(|(i, _)| *i != id.0);
                if list.is_empty() {
                    events.remove(&e);
                }
            }
            if events.is_empty() {
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
        let levels = [("*", "*"), (ev.source(), "*"), (ev.source(), ev.event())];
        for (i, (s, e)) in levels.iter().enumerate() {
            if levels[..i].contains(&(*s, *e)) {
                continue;
            }
            let Some(list) = self.table.get_mut(*s).and_then(|m| m.get_mut(*e)) else { continue };
            for (id, cb) in list.iter_mut() {
                st.called += 1;
                if catch_unwind(AssertUnwindSafe(|| cb(ev))).is_err() {
                    st.panicked += 1;
                    tracing::error!(
                        subscription = *id,
                        source = ev.source(),
                        event = ev.event(),
                        "event callback panicked"
                    );
                }
            }
        }
        st
    }
}
