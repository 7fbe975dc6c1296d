//! Control-frame bodies a peer sends: a DIVERT pattern list (from the agent to the broker,
//! from the broker to every worker), an INSPECT_REPLY (from the broker to an inspector) and
//! an ACK (from a worker to the broker, socket transport; also replayed as a stream of
//! frames written and acknowledgements against the broker's record). No parser may panic on
//! any bytes, and a pattern list that is accepted must be its own encoding (what a broker
//! forwards is exactly what it parsed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use worker_events::fuzz_api::{ack_body, divert_patterns, inspect_reply};

fuzz_target!(|data: &[u8]| {
    if let Ok(encoded) = divert_patterns(data) {
        assert_eq!(encoded, data, "an accepted pattern list re-encodes to other bytes");
    }
    let _ = inspect_reply(data);
    if let Ok(total) = ack_body(data) {
        assert_eq!(data, total.to_le_bytes(), "an accepted ACK is exactly its total");
    }
});
