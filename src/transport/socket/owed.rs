//! (broker, socket transport) The queue of a slot gone for good ([`super::DETACHED_KEEP`]
//! without a connection) is dropped; what it held becomes lost notices owed to the slot's
//! next holder.

use rkyv::util::AlignedVec;

use super::seq::{STAMP_LEN, UNSEQUENCED};
use crate::layout::Geometry;
use crate::message;
use crate::wire::frame::kind;
use crate::wire::queue::OutQueue;

/// Drop everything queued for a slot gone for good: each "all" event becomes a lost notice
/// owed to the slot (by publisher), and lost notices already queued are owed again. Returns
/// the events dropped (unique ones included).
pub(super) fn drop_queue(q: &mut OutQueue, geo: Geometry, max_payload_len: usize) -> u64 {
    let mut owed: Vec<(u32, u64)> = Vec::new();
    let mut msg = AlignedVec::<16>::new();
    let mut dropped = 0u64;
    q.drain_frames(|k, body| {
        let (origin, count) = match k {
            // A unique event (unstamped) is counted dropped but owes no notice: notices
            // count "all" events, which the receiver takes off its next sequence gap.
            kind::DELIVER if body.starts_with(&UNSEQUENCED) => {
                dropped += 1;
                return;
            }
            kind::DELIVER => {
                msg.clear();
                msg.extend_from_slice(body.get(STAMP_LEN..).unwrap_or_default());
                match message::decode(&msg, geo.workers, geo.agent, max_payload_len) {
                    Ok(d) => match d.event.wid {
                        Some(w) => {
                            dropped += 1;
                            (geo.slot_of(w), 1)
                        }
                        None => return,
                    },
                    Err(_) => return,
                }
            }
            kind::LOST => match super::lost_body(body) {
                Some(oc) => oc,
                None => return,
            },
            _ => return,
        };
        match owed.iter_mut().find(|(o, _)| *o == origin) {
            Some(e) => e.1 = e.1.saturating_add(count),
            None => owed.push((origin, count)),
        }
    });
    for (origin, count) in owed {
        q.note_lost_n(origin, count);
    }
    dropped
}
