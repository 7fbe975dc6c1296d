//! # worker-events-bridge
//!
//! Carries [`worker_events`] events across hosts through NATS JetStream: one bridge process
//! per host, one NATS (cluster) for the fleet.
//!
//! ```text
//!  host A                                   NATS JetStream                 host B
//!  workers --bus--> bridge A (agent) --> stream <PREFIX>: <prefix>.ev.A --> bridge B --bus--> workers
//!                            \--- KV <prefix>-unique: create(hash) ---/
//! ```
//!
//! ## Design decisions
//!
//! * **The privileged agent.** The bridge attaches to the local bus as
//!   `Wid::PrivilegedAgent` with the proxy's own bus options (the bus must enable the agent),
//!   so the core crate keeps no threads and no worker slot is taken. One subscription,
//!   `("*", "*")`, sees every event. Never a worker slot: a worker is a target of the host's
//!   unique events (the agent never is), which the bridge could not run, and only the agent
//!   can divert cluster-unique events (`Worker::divert_unique`).
//! * **One tokio runtime, the agent on it.** The agent is a
//!   [`worker_events::tokio::AsyncWorker`] owned by one task, the *bus loop*, which also
//!   publishes what is imported and what won a unique claim: a `Worker` is single-threaded,
//!   so one owner and no locks; its callbacks only push into the export buffer or the claim
//!   queue. NATS I/O runs in other tasks (export, import, acknowledgements, claims), so a
//!   slow or absent NATS never stalls the bus loop: the local bus works unaffected.
//! * **Export** (`<prefix>.ev.<host>`): an event matching an export pattern, not relayed
//!   (no `origin_host`, not published by the agent: no loops) and not a library notice goes
//!   into a bounded buffer ([`Config::outbound_buffer`]), then into the stream, in order,
//!   with a per-origin-host sequence number (consecutive from 1; a restarted bridge
//!   continues after the last number in the stream). A full buffer drops the event, counted
//!   and logged, and the dropped numbers still go out as a *gap marker*, as do the events
//!   the agent missed locally (a `lost` notice it received): receivers always see the gap.
//!   A publish that is not acknowledged is resent with the whole window after it, same
//!   numbers, same order (`Nats-Msg-Id` lets JetStream drop copies it has): never reordered.
//! * **Import**: a durable pull consumer per host (`<prefix>-<host>`, explicit acks, new
//!   messages only when first created). Own messages are acked and skipped. A sequence
//!   number already seen is a duplicate (acked, skipped); a jump, or a gap marker, becomes
//!   a `lost` notice for that origin (`report_relayed_lost`); an event is published as an
//!   `All` event stamped with its origin host (`publish_relayed`), its number recorded in the
//!   state file ([`Config::state_file`]), and only then acknowledged. Messages removed by
//!   the stream's limits (max age / bytes / messages) show as jumps: `lost` notices.
//! * **The duplicate window.** A bridge killed after a local publish and before the
//!   state-file write (one positioned `write`, microseconds) republishes that one event when
//!   it restarts (at least once for it). Killed after the write and before the ack reaches
//!   NATS: the redelivery is recognized by its number and skipped. A publish on the bus is
//!   itself not atomic across workers (a process killed inside it reaches some workers), so
//!   the core offers nothing to close the first window with.
//! * **Cluster-unique events**: the core diverts every local `Unique` publish matching a
//!   [`Config::cluster_unique`] pattern to the agent (`divert_unique`). The bridge claims
//!   the hash with a create-if-absent in a KV bucket whose entries expire after the bus's
//!   `unique_timeout`: the winner publishes it locally as an ordinary unique event (the local
//!   dedup applies), a loser drops it (counted). NATS unreachable: the event is delivered
//!   locally anyway and counted as *unclaimed* (availability over the cluster-wide
//!   guarantee; it is still unique on this host).
//!
//! ## Guarantees and limits
//!
//! * Per exporting host, receivers get events in export order, each once, and every event
//!   that does not arrive is counted in a `lost` notice with `origin_host` set: received +
//!   lost = published, per origin host, across NATS and bridge crashes.
//! * Limits: the duplicate window above; after a NATS failure, an event in flight that comes
//!   back after later ones (a write lost with the connection, a redelivery after the ack
//!   wait) is reported lost rather than delivered late (order is never broken); a local
//!   `lost` notice advances the sequence by its whole count, whatever patterns the missed
//!   events had; a cluster-unique event is run locally without a claim while NATS is
//!   unreachable (`unique_unclaimed`); a host that joins does not replay the past; there is
//!   no order between hosts.
//!
//! ## Example
//!
//! ```no_run
//! use worker_events_bridge::{Bridge, Config};
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = Config::from_args(std::env::args().skip(1))?;
//! Bridge::new(cfg).run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

mod bridge;
mod config;
mod local;
mod outbox;
mod pattern;
mod seq;
mod stats;
mod wire;

pub use bridge::{Bridge, BridgeError};
pub use config::{BusConfig, Config, ConfigError, NatsConfig};
pub use pattern::Pattern;
pub use stats::{ConnectionState, Stats, StatsHandle};
