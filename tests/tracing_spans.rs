//! `tracing` output for operators: attach, election and failover run inside spans carrying
//! the worker, its pid, the broker and the epoch; the per-event path logs nothing at info
//! level or above, and a condition that repeats for every event (here a full unique table)
//! is logged at most once per second with a count of the lines left out.
//!
//! A capturing `Layer` is installed as this thread's default subscriber; the workers of each
//! test run on the test's own thread.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use worker_events::{Events, Options, Target, Transport, Wid, Worker};
use worker_events_dev_support::TempDir;

type Fields = BTreeMap<String, String>;

#[derive(Debug, Clone)]
struct SpanRec {
    name: &'static str,
    fields: Fields,
}

#[derive(Debug, Clone)]
struct EventRec {
    level: Level,
    fields: Fields,
    /// Indexes into `Log::spans` of the enclosing spans, innermost first.
    scope: Vec<usize>,
}

impl EventRec {
    fn message(&self) -> &str {
        self.fields.get("message").map_or("", |s| s.as_str())
    }
}

#[derive(Debug, Default)]
struct Log {
    spans: Vec<SpanRec>,
    events: Vec<EventRec>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Log>>);

/// The index of a span's record, kept in the span's extensions.
struct Idx(usize);

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Collect(&mut fields));
        let mut log = self.0.lock().unwrap();
        log.spans.push(SpanRec { name: attrs.metadata().name(), fields });
        let idx = log.spans.len() - 1;
        ctx.span(id).unwrap().extensions_mut().insert(Idx(idx));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        let ext = span.extensions();
        let idx = ext.get::<Idx>().unwrap().0;
        values.record(&mut Collect(&mut self.0.lock().unwrap().spans[idx].fields));
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut Collect(&mut fields));
        let scope = ctx
            .event_scope(event)
            .map(|s| s.filter_map(|span| span.extensions().get::<Idx>().map(|i| i.0)).collect())
            .unwrap_or_default();
        self.0.lock().unwrap().events.push(EventRec { level: *event.metadata().level(), fields, scope });
    }
}

impl Capture {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    fn spans(&self, name: &str) -> Vec<SpanRec> {
        self.0.lock().unwrap().spans.iter().filter(|s| s.name == name).cloned().collect()
    }

    /// Events whose message starts with `prefix`, each with its enclosing spans.
    fn events(&self, prefix: &str) -> Vec<(EventRec, Vec<SpanRec>)> {
        let log = self.0.lock().unwrap();
        log.events
            .iter()
            .filter(|e| e.message().starts_with(prefix))
            .map(|e| (e.clone(), e.scope.iter().map(|&i| log.spans[i].clone()).collect()))
            .collect()
    }

    fn clear(&self) {
        let mut log = self.0.lock().unwrap();
        log.events.clear();
    }

    /// Events at INFO, WARN or ERROR.
    fn loud(&self) -> Vec<EventRec> {
        self.0.lock().unwrap().events.iter().filter(|e| e.level <= Level::INFO).cloned().collect()
    }
}

fn pump_until(ws: &mut [&mut Worker], what: &str, done: impl Fn(&[&mut Worker]) -> bool) {
    let limit = Instant::now() + Duration::from_secs(20);
    while !done(ws) {
        assert!(Instant::now() < limit, "timed out waiting for {what}");
        for w in ws.iter_mut() {
            w.wait(Some(Duration::from_millis(1))).unwrap();
        }
    }
}

fn field<'a>(s: &'a SpanRec, name: &str) -> &'a str {
    s.fields.get(name).unwrap_or_else(|| panic!("span {} has no field {name}: {s:?}", s.name))
}

/// The one span named `name` whose `worker` field is `worker`.
fn span_of(cap: &Capture, name: &str, worker: &str) -> SpanRec {
    let all = cap.spans(name);
    let mine: Vec<_> = all.iter().filter(|s| s.fields.get("worker").is_some_and(|w| w == worker)).collect();
    assert_eq!(mine.len(), 1, "one {name} span of {worker}: {all:?}");
    mine[0].clone()
}

/// An event starting with `prefix`, at `level`, inside `span` (same name and fields).
fn assert_event_in(cap: &Capture, prefix: &str, level: Level, span: &SpanRec) {
    let evs = cap.events(prefix);
    assert!(
        evs.iter()
            .any(|(e, scope)| e.level == level && scope.iter().any(|s| s.name == span.name && s.fields == span.fields)),
        "no {level} event {prefix:?} inside {span:?}: {evs:?}"
    );
}

#[test]
fn attach_election_and_failover_run_in_spans_with_operator_fields() {
    let cap = Capture::default();
    let _sub = cap.install();
    let pid = std::process::id().to_string();
    let d = TempDir::new("tracing-spans");
    let events = Events::new(Options::new(d.join("ev.sock")).workers(2)).unwrap();
    let mut w0 = events.init_worker(Wid::Worker(0)).unwrap();
    let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
    pump_until(&mut [&mut w0, &mut w1], "attach", |ws| ws.iter().all(|w| w.is_ready()));
    assert!(w0.is_broker());

    // Worker 0 (the preferred broker) is elected: the span carries its epoch.
    let elected = span_of(&cap, "election", "worker 0");
    assert_eq!(field(&elected, "pid"), pid);
    let epoch: u64 = field(&elected, "epoch").parse().expect("epoch recorded once serving");
    assert!(epoch >= 1);
    assert_event_in(&cap, "serving as the broker", Level::INFO, &elected);
    assert_event_in(&cap, "listening as the broker", Level::INFO, &elected);

    // Worker 1 attaches to it.
    let attach = span_of(&cap, "attach", "worker 1");
    assert_eq!(field(&attach, "pid"), pid);
    assert_eq!(field(&attach, "broker"), "worker 0");
    assert_eq!(field(&attach, "epoch"), epoch.to_string());
    assert_eq!(field(&attach, "reattach"), "false");
    assert_event_in(&cap, "attached", Level::INFO, &attach);

    // The broker goes away: worker 1 fails over, is elected with the next epoch.
    drop(w0);
    pump_until(&mut [&mut w1], "worker 1 to become the broker", |ws| ws[0].is_broker());
    let failover = span_of(&cap, "failover", "worker 1");
    assert_eq!(field(&failover, "pid"), pid);
    assert_eq!(field(&failover, "broker"), "worker 0");
    assert_eq!(field(&failover, "epoch"), epoch.to_string());
    assert_event_in(&cap, "lost the broker", Level::WARN, &failover);
    let reelected = span_of(&cap, "election", "worker 1");
    assert_eq!(field(&reelected, "epoch"), (epoch + 1).to_string());
    assert_event_in(&cap, "new broker", Level::INFO, &reelected);
}

/// A broker that stops serving (its process does not run its event loop: stuck in a
/// callback, or stopped) is replaced by a takeover; when it runs again it finds the newer
/// epoch and steps down. Both run in spans with the fields an operator needs.
#[test]
fn takeover_of_a_stuck_broker_and_its_step_down_run_in_spans() {
    let cap = Capture::default();
    let _sub = cap.install();
    let pid = std::process::id().to_string();
    let d = TempDir::new("tracing-takeover");
    let opts = Options::new(d.join("ev.sock")).workers(2).transport(Transport::SharedMemory);
    let events = Events::new(opts).unwrap();
    let mut w0 = events.init_worker(Wid::Worker(0)).unwrap();
    let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
    pump_until(&mut [&mut w0, &mut w1], "attach", |ws| ws.iter().all(|w| w.is_ready()));
    assert!(w0.is_broker());
    let epoch: u64 = field(&span_of(&cap, "election", "worker 0"), "epoch").parse().unwrap();

    // Worker 0 no longer runs its loop: its heartbeat goes stale and worker 1 takes over.
    pump_until(&mut [&mut w1], "worker 1 to take the stuck broker's role over", |ws| ws[0].is_broker());
    let takeover = span_of(&cap, "takeover", "worker 1");
    assert_eq!(field(&takeover, "pid"), pid);
    assert_eq!(field(&takeover, "stuck"), "worker 0");
    assert_eq!(field(&takeover, "epoch"), (epoch + 1).to_string());
    assert_event_in(&cap, "the broker has not served", Level::WARN, &takeover);
    assert!(cap.spans("step_down").is_empty(), "nobody stepped down yet");

    // Worker 0 runs again: fenced by the newer epoch, it steps down.
    pump_until(&mut [&mut w0], "worker 0 to step down", |ws| !ws[0].is_broker());
    let down = span_of(&cap, "step_down", "worker 0");
    assert_eq!(field(&down, "pid"), pid);
    assert_eq!(field(&down, "epoch"), epoch.to_string());
    assert_eq!(field(&down, "current"), (epoch + 1).to_string());
    assert_event_in(&cap, "a newer broker exists", Level::WARN, &down);
    // And it attaches to the new broker as an ordinary worker.
    pump_until(&mut [&mut w0, &mut w1], "worker 0 to re-attach", |ws| ws[0].is_ready() && ws[1].is_broker());
}

#[test]
fn a_stream_of_events_logs_nothing_at_info_or_above() {
    let cap = Capture::default();
    let _sub = cap.install();
    let d = TempDir::new("tracing-quiet");
    let events = Events::new(Options::new(d.join("ev.sock")).workers(2)).unwrap();
    let mut w0 = events.init_worker(Wid::Worker(0)).unwrap();
    let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
    pump_until(&mut [&mut w0, &mut w1], "attach", |ws| ws.iter().all(|w| w.is_ready()));
    assert!(!cap.loud().is_empty(), "attaching logs at info: the capture works");
    cap.clear();
    w0.subscribe("s", "*", |_| {});
    w1.subscribe("s", "*", |_| {});
    for batch in 0..100u64 {
        for n in 0..100u64 {
            w0.publish(Target::All, "s", "e", &(batch * 100 + n)).unwrap();
        }
        w1.publish_bytes(Target::Unique(&format!("u{batch}")), "s", "u", b"x").unwrap();
        pump_until(&mut [&mut w0, &mut w1], "the batch", |ws| ws[1].stats().delivered >= (batch + 1) * 100);
    }
    pump_until(&mut [&mut w0, &mut w1], "every event", |ws| {
        ws[0].stats().delivered + ws[1].stats().delivered >= 2 * 10_000 + 100
    });
    assert_eq!(w1.stats().lost + w0.stats().lost, 0);
    let loud = cap.loud();
    assert!(loud.is_empty(), "{} lines at info or above on the event path, first: {:?}", loud.len(), loud.first());
}

#[test]
fn a_condition_repeating_per_event_is_logged_once_per_second() {
    let cap = Capture::default();
    let _sub = cap.install();
    // A table of a few entries: after them, every new hash finds the window full.
    let d = TempDir::new("tracing-storm");
    let opts = Options::new(d.join("ev.sock")).workers(1).unique_capacity(1).unique_timeout(Duration::from_secs(60));
    let events = Events::new(opts).unwrap();
    let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    pump_until(&mut [&mut w], "attach", |ws| ws[0].is_ready());
    w.subscribe("s", "*", |_| {});
    let start = Instant::now();
    for n in 0..10_000u64 {
        w.publish_bytes(Target::Unique(&format!("h{n}")), "s", "u", b"x").unwrap();
        if n % 100 == 99 {
            while w.dispatch().unwrap() > 0 {}
        }
    }
    while w.dispatch().unwrap() > 0 {}
    let took = start.elapsed();
    let unrecorded = w.stats().unique_unrecorded;
    assert!(unrecorded > 9_000, "the table window was full for nearly every event: {unrecorded}");
    let lines = cap.events("unique table window full");
    let bound = took.as_secs() + 1;
    assert!(
        !lines.is_empty() && lines.len() as u64 <= bound,
        "{} lines for {unrecorded} events in {took:?} (at most {bound})",
        lines.len()
    );
    assert_eq!(lines[0].0.level, Level::WARN);
    assert!(lines[0].0.fields.contains_key("suppressed"), "{:?}", lines[0].0);
}
