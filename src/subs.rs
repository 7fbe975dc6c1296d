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

use crate::context::Context;
use crate::event::{Event, Wid};
use crate::message::Ext;

/// A subscription callback (a plain `FnMut(&Event)` is wrapped to ignore the context).
pub(crate) type Callback = Box<dyn FnMut(&mut Context, &Event<'_>) + Send + 'static>;

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
/// Whole 8-byte words, then the tail (1-7 bytes) as one more word: one multiply round per
/// 8 bytes, never one per byte.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    #[inline]
    fn round(&mut self, w: u64) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.round(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let r = chunks.remainder();
        let n = r.len();
        let w = if n >= 4 {
            // Two (possibly overlapping) 4-byte reads cover 4..=7 bytes.
            let lo = u32::from_le_bytes(r[..4].try_into().expect("4 bytes"));
            let hi = u32::from_le_bytes(r[n - 4..].try_into().expect("4 bytes"));
            u64::from(lo) | (u64::from(hi) << 32)
        } else if n > 0 {
            u64::from(r[0]) | (u64::from(r[n / 2]) << 8) | (u64::from(r[n - 1]) << 16)
        } else {
            return;
        };
        // The tail length keeps "ab" and "abb" (same bytes read) apart.
        self.round(w ^ ((n as u64) << 59));
    }

    #[inline]
    fn write_u8(&mut self, b: u8) {
        self.round(u64::from(b));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
type List = Vec<(u64, Callback)>;
/// Index of a list in [`Subscriptions::lists`] (stable while the list exists).
type ListId = u32;

/// The subscriptions of one source name.
struct BySource {
    /// `(source, "*")`, in subscription order (possibly empty).
    any: ListId,
    /// `(source, event)` by event name, each in subscription order (never empty).
    events: FxMap<Box<str>, ListId>,
}

/// The last (source, event) looked up and what it resolved to: a stream repeats the same
/// names for thousands of events, so a repeated pair costs one short compare, no hashing
/// and (for received messages) no UTF-8 validation. Cleared by every subscribe and
/// unsubscribe, the only changes to the tables. Received events and the publisher's own
/// `wants` question each have one: a worker that answers "ping" with "pong" would otherwise
/// evict one pair with the other twice per round trip.
#[derive(Default)]
struct Memo {
    valid: bool,
    source: String,
    event: String,
    /// `source` then `event`, as a received message carries them
    /// ([`Subscriptions::run_joined`] compares both names with one compare). Redundant
    /// with the two names on purpose: deriving them from `joined` and the source's length
    /// (one string instead of three) measured 8-14 more instructions per delivered event
    /// (callgrind, `benches/hot_path.rs`), for the split and its char-boundary check.
    joined: Vec<u8>,
    /// The `(source, "*")` list to run (already `None` for a literal `"*"` source, or when
    /// that list is empty).
    any: Option<ListId>,
    /// The `(source, event)` list to run (already `None` for a literal `"*"` event, or when
    /// that list is empty).
    event_list: Option<ListId>,
}

impl Memo {
    #[inline]
    fn hit(&self, source: &[u8], event: &[u8]) -> bool {
        self.valid && same(self.source.as_bytes(), source) && same(self.event.as_bytes(), event)
    }

    /// [`Memo::hit`] for the two names joined (`names[..src_len]` and `names[src_len..]`).
    #[inline(always)]
    fn hit_joined(&self, names: &[u8], src_len: usize) -> bool {
        self.valid && self.source.len() == src_len && same(&self.joined, names)
    }
}

/// `a == b`, inline for names up to 16 bytes (two overlapping word compares instead of a
/// `memcmp` call).
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        8..=16 => {
            let w = |s: &[u8]| {
                let lo = u64::from_le_bytes(s[..8].try_into().expect("8 bytes"));
                (lo, u64::from_le_bytes(s[n - 8..].try_into().expect("8 bytes")))
            };
            w(a) == w(b)
        }
        4..=7 => {
            let w = |s: &[u8]| {
                let lo = u32::from_le_bytes(s[..4].try_into().expect("4 bytes"));
                (lo, u32::from_le_bytes(s[n - 4..].try_into().expect("4 bytes")))
            };
            w(a) == w(b)
        }
        0..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        _ => a == b,
    }
}

#[derive(Default)]
pub(crate) struct Subscriptions {
    next: u64,
    /// `("*", "*")`, in subscription order.
    wild: List,
    /// Every other subscription, by source name.
    table: FxMap<Box<str>, BySource>,
    /// The lists the table points to; `free` holds the ids of removed ones.
    lists: Vec<List>,
    free: Vec<ListId>,
    index: HashMap<u64, (Box<str>, Box<str>)>,
    /// What the last received (or locally run) event resolved to.
    memo: Memo,
    /// What the last [`Subscriptions::wants`] (asked on every `All` publish) resolved to.
    wants_memo: Memo,
}

/// Outcome of running the callbacks for one event.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RunStats {
    pub called: u64,
    pub panicked: u64,
}

impl Subscriptions {
    fn new_list(&mut self) -> ListId {
        match self.free.pop() {
            Some(id) => id,
            None => {
                self.lists.push(List::new());
                ListId::try_from(self.lists.len() - 1).expect("fewer than 2^32 subscription lists")
            }
        }
    }

    fn free_list(&mut self, id: ListId) {
        self.lists[id as usize] = List::new();
        self.free.push(id);
    }

    pub(crate) fn subscribe(&mut self, source: &str, event: &str, cb: Callback) -> SubscriptionId {
        self.memo.valid = false;
        self.wants_memo.valid = false;
        self.next += 1;
        let id = self.next;
        let list = match (source, event) {
            ("*", "*") => None,
            (s, e) => {
                if !self.table.contains_key(s) {
                    let any = self.new_list();
                    self.table.insert(s.into(), BySource { any, events: FxMap::default() });
                }
                if e == "*" {
                    Some(self.table[s].any)
                } else if let Some(&l) = self.table[s].events.get(e) {
                    Some(l)
                } else {
                    let l = self.new_list();
                    self.table.get_mut(s).expect("inserted above").events.insert(e.into(), l);
                    Some(l)
                }
            }
        };
        match list {
            None => self.wild.push((id, cb)),
            Some(l) => self.lists[l as usize].push((id, cb)),
        }
        self.index.insert(id, (source.into(), event.into()));
        SubscriptionId(id)
    }

    pub(crate) fn unsubscribe(&mut self, id: SubscriptionId) -> bool {
        let Some((s, e)) = self.index.remove(&id.0) else { return false };
        self.memo.valid = false;
        self.wants_memo.valid = false;
        let keep = |(i, _): &(u64, Callback)| *i != id.0;
        if (&*s, &*e) == ("*", "*") {
            self.wild.retain(keep);
            return true;
        }
        let Some(by) = self.table.get_mut(&s) else { return true };
        let any = by.any;
        if &*e == "*" {
            self.lists[any as usize].retain(keep);
        } else if let Some(&l) = by.events.get(&e) {
            self.lists[l as usize].retain(keep);
            if self.lists[l as usize].is_empty() {
                by.events.remove(&e);
                self.free_list(l);
            }
        }
        let by = &self.table[&s];
        if self.lists[any as usize].is_empty() && by.events.is_empty() {
            self.table.remove(&s);
            self.free_list(any);
        }
        true
    }

    /// Resolve `(source, event)` into `m` (a miss hashes and probes the tables). Empty
    /// lists resolve to `None`: the tables only change in subscribe and unsubscribe, which
    /// clear the memos.
    fn resolve(table: &FxMap<Box<str>, BySource>, lists: &[List], m: &mut Memo, source: &str, event: &str) {
        let (mut any, mut event_list) = (None, None);
        if let Some(by) = table.get(source) {
            if source != "*" {
                any = Some(by.any);
            }
            if event != "*" {
                event_list = by.events.get(event).copied();
            }
        }
        let nonempty = |l: Option<ListId>| l.filter(|&l| !lists[l as usize].is_empty());
        let (any, event_list) = (nonempty(any), nonempty(event_list));
        m.source.clear();
        m.source.push_str(source);
        m.event.clear();
        m.event.push_str(event);
        m.joined.clear();
        m.joined.extend_from_slice(source.as_bytes());
        m.joined.extend_from_slice(event.as_bytes());
        m.any = any;
        m.event_list = event_list;
        m.valid = true;
    }

    /// Whether an event `(source, event)` would run at least one callback now.
    #[cfg(test)]
    pub(crate) fn wants(&mut self, source: &str, event: &str) -> bool {
        self.wants_joined(&[source, event].concat().into_bytes(), source, event)
    }

    /// [`Subscriptions::wants`] given also both names joined (`source` then `event`, as the
    /// encoded message holds them): a memo hit is one compare of the joined bytes.
    pub(crate) fn wants_joined(&mut self, joined: &[u8], source: &str, event: &str) -> bool {
        if !self.wild.is_empty() {
            return true;
        }
        if !self.wants_memo.hit_joined(joined, source.len()) {
            Self::resolve(&self.table, &self.lists, &mut self.wants_memo, source, event);
        }
        self.wants_memo.any.is_some() || self.wants_memo.event_list.is_some()
    }

    /// Run the callbacks for `ev`: `("*","*")`, then `(source,"*")`, then `(source,event)`,
    /// each level in subscription order. A level identical to an earlier one (an event
    /// whose source or name is literally `"*"`) is not run twice. A panicking callback is
    /// caught and logged; the others still run.
    pub(crate) fn run(&mut self, ev: &Event<'_>, cx: &mut Context) -> RunStats {
        if !self.memo.hit(ev.source.as_bytes(), ev.event.as_bytes()) {
            Self::resolve(&self.table, &self.lists, &mut self.memo, ev.source, ev.event);
        }
        let Subscriptions { wild, lists, memo, .. } = self;
        run_levels(wild, lists, memo.any, memo.event_list, ev, cx)
    }

    /// [`Subscriptions::run`] for an event whose names are still unchecked bytes (as read
    /// from another process), given joined as a message carries them: the source is
    /// `names[..src_len]`, the event `names[src_len..]` (`src_len <= names.len()`). A pair
    /// equal to the memo's needs no UTF-8 validation (the memo's names were validated) and
    /// costs one compare of the joined bytes; otherwise the names are validated here.
    /// `None` when a name is not UTF-8 (nothing ran).
    #[inline(always)]
    pub(crate) fn run_joined(
        &mut self,
        names: &[u8],
        src_len: usize,
        data: &[u8],
        wid: Option<Wid>,
        ext: Ext<'_>,
        cx: &mut Context,
    ) -> Option<RunStats> {
        if !self.memo.hit_joined(names, src_len) {
            let (source, event) = names.split_at_checked(src_len)?;
            let s = std::str::from_utf8(source).ok()?;
            let e = std::str::from_utf8(event).ok()?;
            Self::resolve(&self.table, &self.lists, &mut self.memo, s, e);
        }
        // The names are the memo's own (equal bytes): no validation, no lifetime games.
        let Subscriptions { wild, lists, memo, .. } = self;
        let ev = Event { source: &memo.source, event: &memo.event, data, wid, ext };
        Some(run_levels(wild, lists, memo.any, memo.event_list, &ev, cx))
    }

    /// [`Subscriptions::run_joined`] with the names apart (the unit tests' form).
    #[cfg(test)]
    pub(crate) fn run_raw(
        &mut self,
        source: &[u8],
        event: &[u8],
        data: &[u8],
        wid: Option<Wid>,
        ext: Ext<'_>,
        cx: &mut Context,
    ) -> Option<RunStats> {
        self.run_joined(&[source, event].concat(), source.len(), data, wid, ext, cx)
    }
}

#[inline(always)]
fn run_levels(
    wild: &mut List,
    lists: &mut [List],
    any: Option<ListId>,
    event_list: Option<ListId>,
    ev: &Event<'_>,
    cx: &mut Context,
) -> RunStats {
    let mut st = RunStats::default();
    if !wild.is_empty() {
        run_list(wild, ev, cx, &mut st);
    }
    if let Some(l) = any {
        run_list(&mut lists[l as usize], ev, cx, &mut st);
    }
    if let Some(l) = event_list {
        run_list(&mut lists[l as usize], ev, cx, &mut st);
    }
    st
}

#[inline(always)]
fn run_list(list: &mut List, ev: &Event<'_>, cx: &mut Context, st: &mut RunStats) {
    for (id, cb) in list.iter_mut() {
        st.called += 1;
        if catch_unwind(AssertUnwindSafe(|| cb(cx, ev))).is_err() {
            st.panicked += 1;
            crate::log_limit::log_limited!(
                tracing::Level::ERROR,
                subscription = *id,
                source = ev.source(),
                event = ev.event(),
                "event callback panicked"
            );
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn ev<'a>(source: &'a str, event: &'a str) -> Event<'a> {
        Event { source, event, data: &[], wid: None, ext: Ext::None }
    }

    #[test]
    fn levels_run_in_order_once_each_even_for_literal_stars() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut subs = Subscriptions::default();
        let mut ids = Vec::new();
        for (s, e) in [("a", "x"), ("*", "*"), ("a", "*"), ("*", "x"), ("a", "x")] {
            let l = log.clone();
            let tag = format!("{s}/{e}#{}", ids.len());
            ids.push(subs.subscribe(s, e, Box::new(move |_, _| l.lock().unwrap().push(tag.clone()))));
        }
        let run = |subs: &mut Subscriptions, s: &str, e: &str| {
            log.lock().unwrap().clear();
            subs.run(&ev(s, e), &mut Context::default());
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
        assert_eq!(subs.free.len(), subs.lists.len(), "every list is free again");
    }

    #[test]
    fn the_memo_follows_subscribe_and_unsubscribe() {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let mut subs = Subscriptions::default();
        assert!(!subs.wants("a", "x"));
        assert_eq!(subs.run(&ev("a", "x"), &mut Context::default()).called, 0);
        let h = hits.clone();
        let id = subs.subscribe("a", "x", Box::new(move |_, e| h.lock().unwrap().push(e.event().to_owned())));
        // The pair is memoized as "nothing" from the run above: the subscribe must clear it.
        assert!(subs.wants("a", "x") && !subs.wants("a", "y") && !subs.wants("b", "x"));
        assert_eq!(subs.run_raw(b"a", b"x", &[], None, Ext::None, &mut Context::default()).map(|r| r.called), Some(1));
        assert_eq!(
            subs.run_raw(b"a", b"x", &[], None, Ext::None, &mut Context::default()).map(|r| r.called),
            Some(1),
            "memo hit"
        );
        assert_eq!(subs.run_raw(b"a", b"y", &[], None, Ext::None, &mut Context::default()).map(|r| r.called), Some(0));
        assert!(
            subs.run_raw(b"a", &[0xff], &[], None, Ext::None, &mut Context::default()).is_none(),
            "invalid UTF-8 is refused"
        );
        assert!(subs.run_raw(&[0xc3], b"x", &[], None, Ext::None, &mut Context::default()).is_none());
        assert_eq!(*hits.lock().unwrap(), ["x", "x"]);
        assert!(subs.unsubscribe(id));
        assert!(!subs.wants("a", "x"));
        assert_eq!(subs.run(&ev("a", "x"), &mut Context::default()).called, 0);
        let any = subs.subscribe("*", "*", Box::new(|_, _| {}));
        assert!(subs.wants("b", "z"));
        assert!(subs.unsubscribe(any) && !subs.wants("b", "z"));
    }

    #[test]
    fn publishing_one_pair_and_receiving_another_keep_both_memoized() {
        let mut subs = Subscriptions::default();
        subs.subscribe("bench", "pong", Box::new(|_, _| {}));
        for _ in 0..3 {
            assert!(!subs.wants("bench", "ping"), "our own ping: nobody local wants it");
            assert_eq!(
                subs.run_raw(b"bench", b"pong", &[], None, Ext::None, &mut Context::default()).map(|r| r.called),
                Some(1)
            );
        }
        assert!(subs.wants_memo.hit(b"bench", b"ping") && subs.memo.hit(b"bench", b"pong"));
        subs.subscribe("bench", "ping", Box::new(|_, _| {}));
        assert!(!subs.wants_memo.valid && !subs.memo.valid, "a subscribe clears both");
        assert!(subs.wants("bench", "ping"));
    }

    #[test]
    fn same_compares_every_length() {
        let long = "abcdefghijklmnopqrstuvwxyz";
        for n in 0..=long.len() {
            let a = &long.as_bytes()[..n];
            assert!(same(a, a));
            for i in 0..n {
                let mut b = a.to_vec();
                b[i] ^= 1;
                assert!(!same(a, &b), "differs at {i} of {n}");
            }
            assert!(!same(a, &long.as_bytes()[..n.saturating_sub(1)]) || n == 0);
        }
    }

    #[test]
    fn fx_tail_is_one_round_and_tells_lengths_apart() {
        let h = |b: &[u8]| {
            let mut f = FxHasher::default();
            f.write(b);
            f.finish()
        };
        let words = ["", "a", "ab", "abb", "abc", "abcd", "abcde", "abcdefg", "abcdefgh", "abcdefghi", "bench", "ping"];
        let mut seen: Vec<u64> = words.iter().map(|w| h(w.as_bytes())).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), words.len(), "distinct short names hash apart");
    }
}
