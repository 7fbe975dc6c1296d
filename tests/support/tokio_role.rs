//! The tokio role ([`Spawn::tokio`](super::cfg::Spawn::tokio)): the child's worker is driven
//! by `worker_events::tokio::AsyncWorker` on a current-thread runtime the child builds after
//! it started (as each forked worker of a prefork server does). No command loop: it prints
//! `@@READY`, then answers every `("ping", "n")` event with payload `n` three ways:
//! - `("pong", "cb")` to all, published from the callback (`Context`);
//! - `("pong", "task")` to all, published by the task that owns the worker after a
//!   "request handler" task handed it `n` over a channel (`worker_mut().publish`);
//! - `("pong", "loc")` to all, published from the callback of a `Target::Current` event
//!   `("loc", "x")` that the owner published with the `pong task` (work no fd announces).
//!
//! A `("ctl", "exit")` event stops it: it prints `@@DONE <dispatched> <zero returns>` and
//! exits 0.

use super::cfg::{Cfg, Spawn};
use super::role::die;

/// Run the role; never returns.
pub fn main(cfg: &Cfg, spawn: &Spawn) -> ! {
    #[cfg(feature = "tokio")]
    {
        run(cfg, spawn);
        std::process::exit(0)
    }
    #[cfg(not(feature = "tokio"))]
    {
        let _ = (cfg, spawn);
        die("the tokio role needs the `tokio` feature")
    }
}

#[cfg(feature = "tokio")]
#[allow(clippy::disallowed_types)] // the test is not the library: a std atomic flag
fn run(cfg: &Cfg, spawn: &Spawn) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use worker_events::tokio::AsyncWorker;
    use worker_events::{Events, Target};

    use super::role::out;
    use super::wid_str;

    let events = Events::new(cfg.options()).unwrap_or_else(|e| die(&format!("Events::new: {e}")));
    let mut w = events.init_worker(spawn.wid).unwrap_or_else(|e| die(&format!("init_worker: {e}")));
    let (to_handler, mut requests) = tokio::sync::mpsc::unbounded_channel::<u64>();
    w.subscribe_with("ping", "n", |cx, ev| {
        let n: u64 = ev.deserialize().unwrap_or(u64::MAX);
        cx.publish(Target::All, "pong", "cb", &n).unwrap_or_else(|e| die(&format!("pong cb: {e}")));
    });
    w.subscribe("ping", "n", move |ev| {
        let _ = to_handler.send(ev.deserialize::<u64>().unwrap_or(u64::MAX));
    });
    w.subscribe_with("loc", "x", |cx, ev| {
        let n: u64 = ev.deserialize().unwrap_or(u64::MAX);
        cx.publish(Target::All, "pong", "loc", &n).unwrap_or_else(|e| die(&format!("pong loc: {e}")));
    });
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    w.subscribe("ctl", "exit", move |_| s.store(true, Ordering::Relaxed));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(&format!("runtime: {e}")));
    rt.block_on(async move {
        let mut aw = AsyncWorker::new(w).unwrap_or_else(|e| die(&format!("AsyncWorker::new: {e}")));
        while !aw.worker().is_ready() {
            tokio::select! {
                r = aw.dispatch() => { r.unwrap_or_else(|e| die(&format!("dispatch: {e}"))); }
                _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
            }
        }
        let wk = aw.worker();
        out(&format!("@@READY {} broker={} transport={:?}", wid_str(Some(wk.wid())), wk.is_broker(), wk.transport()));
        // The "request handler": another task, which hands its work to the owner.
        let (to_owner, mut handled) = tokio::sync::mpsc::unbounded_channel::<u64>();
        tokio::spawn(async move {
            while let Some(n) = requests.recv().await {
                tokio::task::yield_now().await;
                if to_owner.send(n).is_err() {
                    break;
                }
            }
        });
        let (mut dispatched, mut zeros) = (0usize, 0usize);
        while !stop.load(Ordering::Relaxed) {
            tokio::select! {
                r = aw.dispatch() => {
                    let n = r.unwrap_or_else(|e| die(&format!("dispatch: {e}")));
                    dispatched += n;
                    zeros += usize::from(n == 0);
                }
                Some(n) = handled.recv() => {
                    let w = aw.worker_mut();
                    w.publish(Target::All, "pong", "task", &n).unwrap_or_else(|e| die(&format!("pong task: {e}")));
                    w.publish(Target::Current, "loc", "x", &n).unwrap_or_else(|e| die(&format!("loc: {e}")));
                }
            }
        }
        out(&format!("@@DONE {dispatched} {zeros}"));
        let mut w = aw.into_inner();
        w.flush();
        drop(w);
    });
}
