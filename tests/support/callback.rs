//! The reactor ([`Spawn::reactor`](super::cfg::Spawn::reactor)): a child whose callbacks
//! publish, through [`worker_events::Context`], in answer to the events they receive.
//!
//! For each `("trig", <any>)` event with payload `n` (a `u64`) the reactor publishes, from
//! the callback and in this order: `("resp", "a")` with `n` to all workers, `("resp", "b")`
//! with `n` to all workers, and `("resp", "c")` with `n` to itself (`Target::Current`).
//! Publish errors are counted in `@@ERR`-free form: the reactor prints them to stderr
//! and the test compares event counts.

use worker_events::{Target, Worker};

/// Subscribe the reactor's callback.
pub fn react(worker: &mut Worker) {
    worker.subscribe_with("trig", "*", |cx, ev| {
        let Ok(n) = ev.deserialize::<u64>() else { return };
        for (target, name) in [(Target::All, "a"), (Target::All, "b"), (Target::Current, "c")] {
            if let Err(e) = cx.publish(target, "resp", name, &n) {
                eprintln!("reactor: publish resp {name} {n}: {e}");
            }
        }
    });
}
