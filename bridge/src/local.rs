//! The one boundary with the core crate's bridge API (`Event::origin_host`,
//! `Event::unique_hash`, `Worker::publish_relayed`, `Worker::report_relayed_lost`,
//! `Worker::divert_unique`): every call the bridge makes into it is here.

use worker_events::{Event, PublishError, Target, Wid, Worker};

/// The host an event was relayed from (`None`: published on this host).
pub(crate) fn origin_host<'a>(ev: &Event<'a>) -> Option<&'a str> {
    ev.origin_host()
}

/// The hash of a unique event diverted to the agent (`divert_unique`).
pub(crate) fn unique_hash<'a>(ev: &Event<'a>) -> Option<&'a str> {
    ev.unique_hash()
}

/// Did the agent publish this itself? (Its relayed events: never exported again.)
pub(crate) fn from_agent(ev: &Event<'_>) -> bool {
    ev.wid() == Some(Wid::PrivilegedAgent)
}

/// Publish an event relayed from `origin` to every local worker.
pub(crate) fn publish_relayed(
    w: &mut Worker,
    origin: &str,
    source: &str,
    event: &str,
    data: &[u8],
) -> Result<(), PublishError> {
    w.publish_relayed(origin, Target::All, source, event, data)
}

/// Tell every local worker that `count` events from `origin` were lost.
pub(crate) fn report_relayed_lost(w: &mut Worker, origin: &str, count: u64) -> Result<(), PublishError> {
    w.report_relayed_lost(origin, count)
}

/// Divert local `Unique` publishes matching `patterns` to the agent.
pub(crate) fn divert_unique(w: &mut Worker, patterns: &[(&str, &str)]) -> Result<(), worker_events::Error> {
    w.divert_unique(patterns)
}
