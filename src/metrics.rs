//! A worker's [`Stats`] through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`).
//!
//! The crate keeps its counters in the [`Worker`] itself (plain integers, nothing shared, no
//! cost on the event path); [`export`] copies them into whatever recorder the process has
//! installed, typically once per scrape of a `/metrics` route or once per second:
//!
//! * every counter of [`Stats`] as a `metrics` counter named `worker_events_<field>_total`,
//!   set with [`Counter::absolute`](metrics::Counter::absolute) (the worker's own running
//!   total, so exporting twice never double-counts), labelled `worker`;
//! * [`Stats::unique_pending`] as the gauge `worker_events_unique_pending`, labelled `worker`;
//! * each [`PeerStats`] as the gauges `worker_events_peer_outbound_depth`,
//!   `worker_events_peer_backlog` and `worker_events_peer_inbound_depth`, labelled `worker`
//!   and `peer`.
//!
//! Label values: [`worker_label`] (`"0"`, `"1"`, …, `"privileged_agent"`). A process with
//! one worker (the prefork model) exports one `worker` label value; its peers are the other
//! workers. [`describe`] registers a help text and unit for each name (once per process,
//! after installing the recorder).
//!
//! Cost: one [`Worker::stats`] snapshot (a few dozen words and one small vector) and one
//! recorder call per series: 23 + 3 × peers, a few microseconds with a hash-map recorder such
//! as `metrics-exporter-prometheus`. It is not meant for the event path.
//!
//! # Wiring it into a proxy
//!
//! In each worker process (after `fork()`), install a recorder, then export before each
//! render. With `metrics-exporter-prometheus`:
//!
//! ```ignore
//! let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
//! worker_events::metrics::describe();
//! // in the `GET /metrics` handler, with access to the worker (or `AsyncWorker::worker()`):
//! worker_events::metrics::export(&worker);
//! let body = handle.render();
//! ```
//!
//! # Examples
//!
//! ```
//! use worker_events::{Events, Options, Target, Wid};
//! use metrics_util::debugging::DebuggingRecorder;
//!
//! let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
//! let mut w = events.init_worker(Wid::Worker(0)).unwrap();
//! w.subscribe("*", "*", |_| {});
//! w.publish_bytes(Target::All, "s", "e", b"x").unwrap();
//! w.dispatch().unwrap();
//!
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! metrics::with_local_recorder(&recorder, || worker_events::metrics::export(&w));
//! let published = snapshotter.snapshot().into_vec().into_iter().find_map(|(key, _, _, value)| {
//!     (key.key().name() == "worker_events_published_total").then_some(value)
//! });
//! assert_eq!(published, Some(metrics_util::debugging::DebugValue::Counter(1)));
//! ```

use crate::event::Wid;
use crate::stats::{PeerStats, Stats};
use crate::worker::Worker;

/// Name of the per-peer gauge of [`PeerStats::outbound_depth`].
pub const PEER_OUTBOUND_DEPTH: &str = "worker_events_peer_outbound_depth";
/// Name of the per-peer gauge of [`PeerStats::backlog`].
pub const PEER_BACKLOG: &str = "worker_events_peer_backlog";
/// Name of the per-peer gauge of [`PeerStats::inbound_depth`].
pub const PEER_INBOUND_DEPTH: &str = "worker_events_peer_inbound_depth";
/// Name of the gauge of [`Stats::unique_pending`].
pub const UNIQUE_PENDING: &str = "worker_events_unique_pending";

/// Record `worker`'s current counters in the installed recorder ([`export_stats`] of its
/// [`Worker::stats`]).
///
/// # Examples
///
/// ```
/// use worker_events::{Events, Options, Wid};
/// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
/// let w = events.init_worker(Wid::Worker(0)).unwrap();
/// // Without an installed recorder this records nothing (and costs next to nothing).
/// worker_events::metrics::export(&w);
/// ```
pub fn export(worker: &Worker) {
    export_stats(worker.wid(), &worker.stats());
}

/// Record `stats`, a snapshot of worker `wid`'s counters, in the installed recorder: for
/// a caller that already took the snapshot (for a `/stats` page, say) and exports the same
/// figures.
///
/// # Examples
///
/// ```
/// use worker_events::{Events, Options, Wid};
/// let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
/// let w = events.init_worker(Wid::Worker(0)).unwrap();
/// let stats = w.stats();
/// worker_events::metrics::export_stats(w.wid(), &stats);
/// ```
pub fn export_stats(wid: Wid, stats: &Stats) {
    let worker = worker_label(wid);
    // Exhaustive on purpose: a counter added to `Stats` does not compile here until it is
    // exported.
    let Stats {
        published,
        delivered,
        callbacks_run,
        callback_panics,
        dropped,
        lost,
        lost_outbound,
        overflows,
        wakeups_sent,
        wake_writes,
        wakeups_received,
        failovers,
        unique_duplicates,
        unique_unrecorded,
        unique_pending,
        unique_diverted,
        unique_not_diverted,
        unique_resent,
        unique_rerouted,
        unique_unguarded,
        peers,
        corrupt_rings,
        diverts,
        resumes,
    } = stats;
    let counters = [
        ("worker_events_published_total", published),
        ("worker_events_delivered_total", delivered),
        ("worker_events_callbacks_run_total", callbacks_run),
        ("worker_events_callback_panics_total", callback_panics),
        ("worker_events_dropped_total", dropped),
        ("worker_events_lost_total", lost),
        ("worker_events_lost_outbound_total", lost_outbound),
        ("worker_events_overflows_total", overflows),
        ("worker_events_wakeups_sent_total", wakeups_sent),
        ("worker_events_wake_writes_total", wake_writes),
        ("worker_events_wakeups_received_total", wakeups_received),
        ("worker_events_failovers_total", failovers),
        ("worker_events_unique_duplicates_total", unique_duplicates),
        ("worker_events_unique_unrecorded_total", unique_unrecorded),
        ("worker_events_unique_resent_total", unique_resent),
        ("worker_events_corrupt_rings_total", corrupt_rings),
        ("worker_events_unique_diverted_total", unique_diverted),
        ("worker_events_unique_not_diverted_total", unique_not_diverted),
        ("worker_events_unique_rerouted_total", unique_rerouted),
        ("worker_events_unique_unguarded_total", unique_unguarded),
        ("worker_events_diverts_total", diverts),
        ("worker_events_resumes_total", resumes),
    ];
    for (name, value) in counters {
        metrics::counter!(name, "worker" => worker.clone()).absolute(*value);
    }
    metrics::gauge!(UNIQUE_PENDING, "worker" => worker.clone()).set(*unique_pending as f64);
    for &PeerStats { wid: peer, outbound_depth, backlog, inbound_depth } in peers {
        let labels = [("worker", worker.clone()), ("peer", worker_label(peer))];
        metrics::gauge!(PEER_OUTBOUND_DEPTH, &labels).set(outbound_depth as f64);
        metrics::gauge!(PEER_BACKLOG, &labels).set(backlog as f64);
        metrics::gauge!(PEER_INBOUND_DEPTH, &labels).set(inbound_depth as f64);
    }
}

/// The value of the `worker` and `peer` labels for `wid`: its number (`"0"`, `"1"`, …), or
/// `"privileged_agent"`.
///
/// # Examples
///
/// ```
/// use worker_events::{Wid, metrics::worker_label};
/// assert_eq!(worker_label(Wid::Worker(3)), "3");
/// assert_eq!(worker_label(Wid::PrivilegedAgent), "privileged_agent");
/// ```
pub fn worker_label(wid: Wid) -> String {
    match wid {
        Wid::Worker(n) => n.to_string(),
        Wid::PrivilegedAgent => "privileged_agent".to_owned(),
    }
}

/// Register a description (and unit) for every name [`export`] records, in the installed
/// recorder: the `# HELP` lines of a Prometheus page. Call it once after installing the
/// recorder; exporting works without it.
///
/// # Examples
///
/// ```
/// worker_events::metrics::describe();
/// ```
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    let c = |name: &'static str, help: &'static str| describe_counter!(name, Unit::Count, help);
    c("worker_events_published_total", "Successful publish calls.");
    c("worker_events_delivered_total", "Events handed to this worker's callbacks.");
    c("worker_events_callbacks_run_total", "Callback invocations.");
    c("worker_events_callback_panics_total", "Callbacks that panicked (caught).");
    c("worker_events_dropped_total", "Received messages or ring records refused as malformed or corrupt.");
    c("worker_events_lost_total", "Events reported lost to this worker through lost notices.");
    c("worker_events_lost_outbound_total", "Events this worker dropped for a peer whose queue was full.");
    c("worker_events_overflows_total", "Publish calls refused with queue overflow.");
    c("worker_events_wakeups_sent_total", "Parked peers this worker woke.");
    c("worker_events_wake_writes_total", "Eventfd writes those wake-ups took (one fan-out write wakes several).");
    c("worker_events_wakeups_received_total", "Times this worker was woken by a publisher (own or fan-out eventfd).");
    c("worker_events_failovers_total", "Times this worker lost its broker, or stepped down as broker.");
    c("worker_events_unique_duplicates_total", "Unique events dropped as duplicates within unique_timeout.");
    c("worker_events_unique_unrecorded_total", "Unique events delivered unrecorded (table window full).");
    c("worker_events_unique_resent_total", "Unique events resent to a new broker after a failover (socket transport).");
    c("worker_events_corrupt_rings_total", "Inbound rings found corrupt (or resynchronized at attach).");
    c("worker_events_unique_diverted_total", "Unique events diverted to the privileged agent.");
    c(
        "worker_events_unique_not_diverted_total",
        "Unique events matching the agent's diversion patterns routed locally (agent not attached).",
    );
    c(
        "worker_events_unique_rerouted_total",
        "Unique events routed again because their receiver's connection ended before it acknowledged them (socket broker).",
    );
    c(
        "worker_events_unique_unguarded_total",
        "Unique events whose copy the socket broker stopped keeping before their receiver acknowledged them.",
    );
    c(
        "worker_events_diverts_total",
        "Receivers that fell a whole broadcast ring behind and were diverted to their pair ring.",
    );
    c("worker_events_resumes_total", "Diverted receivers told to read the broadcast ring again.");
    describe_gauge!(UNIQUE_PENDING, Unit::Count, "Unique events published and not yet handed on.");
    describe_gauge!(PEER_OUTBOUND_DEPTH, Unit::Count, "Events to the peer not yet consumed (ring plus backlog).");
    describe_gauge!(PEER_BACKLOG, Unit::Count, "Events to the peer waiting in the private backlog (ring full).");
    describe_gauge!(PEER_INBOUND_DEPTH, Unit::Count, "Events from the peer waiting in the inbound ring.");
}
