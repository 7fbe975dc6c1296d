//! The bridge's counters and connection state.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The NATS connection as the bridge last saw it.
///
/// ```
/// use worker_events_bridge::{ConnectionState, Stats};
/// assert_eq!(Stats::default().state(), ConnectionState::Disconnected);
/// assert_eq!(Stats { connected: 1, ..Stats::default() }.state(), ConnectionState::Connected);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not connected yet, or reconnecting (with backoff).
    Disconnected,
    /// Connected, stream, consumer and bucket set up.
    Connected,
}

/// A snapshot of the bridge's counters ([`StatsHandle::snapshot`]).
///
/// ```
/// let s = worker_events_bridge::Stats::default();
/// assert_eq!(s.exported, 0);
/// assert!(s.to_string().contains("exported=0"));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events stored in the stream (acknowledged by JetStream).
    pub exported: u64,
    /// Events published on the local bus from other hosts.
    pub imported: u64,
    /// Events dropped on the export side (the outbound buffer was full): receivers get
    /// `lost` notices for them.
    pub dropped: u64,
    /// Sequence numbers reported lost to the local workers (`lost` notices, import side).
    pub lost: u64,
    /// Messages skipped as already delivered (redeliveries, resent publishes).
    pub duplicates: u64,
    /// Local `lost` notices the agent received (events it missed): counted, and exported as
    /// a gap.
    pub missed_locally: u64,
    /// Cluster-unique events whose claim this host won (delivered locally).
    pub unique_won: u64,
    /// Cluster-unique events another host (or an earlier event) had claimed: dropped.
    pub unique_lost: u64,
    /// Cluster-unique events delivered locally without a claim (NATS unreachable).
    pub unique_unclaimed: u64,
    /// Events waiting in the outbound buffer.
    pub outbound_queued: u64,
    /// Times the NATS connection was (re)established.
    pub connects: u64,
    /// 1 when connected (see [`ConnectionState`]).
    pub connected: u64,
    /// Everything set up at least once: the agent is attached to the bus, the export side
    /// knows where its sequence continues, the durable consumer exists (events exported
    /// from now on reach this host).
    pub ready: bool,
}

impl Stats {
    /// The connection state.
    pub fn state(&self) -> ConnectionState {
        if self.connected == 1 { ConnectionState::Connected } else { ConnectionState::Disconnected }
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "state={:?} exported={} imported={} dropped={} lost={} duplicates={} missed_locally={} \
             unique_won={} unique_lost={} unique_unclaimed={} outbound_queued={} connects={}",
            self.state(),
            self.exported,
            self.imported,
            self.dropped,
            self.lost,
            self.duplicates,
            self.missed_locally,
            self.unique_won,
            self.unique_lost,
            self.unique_unclaimed,
            self.outbound_queued,
            self.connects
        )
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) exported: AtomicU64,
    pub(crate) imported: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) missed_locally: AtomicU64,
    pub(crate) unique_won: AtomicU64,
    pub(crate) unique_lost: AtomicU64,
    pub(crate) unique_unclaimed: AtomicU64,
    pub(crate) outbound_queued: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) connected: AtomicU64,
    pub(crate) export_ready: AtomicU64,
    pub(crate) import_ready: AtomicU64,
    pub(crate) agent_ready: AtomicU64,
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A cheap, cloneable handle on a running bridge's counters ([`crate::Bridge::stats`]).
///
/// ```
/// # let cfg = worker_events_bridge::Config::from_toml("[bus]\nlistening = \"/tmp/x.sock\"").unwrap();
/// let bridge = worker_events_bridge::Bridge::new(cfg);
/// let stats = bridge.stats(); // keep it; `run` consumes the bridge
/// assert!(!stats.snapshot().ready);
/// ```
#[derive(Debug, Clone, Default)]
pub struct StatsHandle(pub(crate) Arc<Counters>);

impl StatsHandle {
    /// The counters now.
    pub fn snapshot(&self) -> Stats {
        let c = &self.0;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            exported: g(&c.exported),
            imported: g(&c.imported),
            dropped: g(&c.dropped),
            lost: g(&c.lost),
            duplicates: g(&c.duplicates),
            missed_locally: g(&c.missed_locally),
            unique_won: g(&c.unique_won),
            unique_lost: g(&c.unique_lost),
            unique_unclaimed: g(&c.unique_unclaimed),
            outbound_queued: g(&c.outbound_queued),
            connects: g(&c.connects),
            connected: g(&c.connected),
            ready: g(&c.export_ready) > 0 && g(&c.import_ready) > 0 && g(&c.agent_ready) > 0,
        }
    }
}
