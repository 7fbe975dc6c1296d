//! `fork()` without `exec` (issue 11, item 18), with real processes: a worker process forks
//! a child that outlives it. The child's copy of the worker refuses to run (`Error::Forked`),
//! dropping it leaves the parent's slot alone, and the child keeps none of the parent's
//! kernel state: once the parent is killed, its worker id is free at once and (when the
//! parent was the broker) a new broker takes over and the restarted worker attaches, while
//! the forked child is still alive.

#[macro_use]
mod support;

use support::*;
use worker_events::{Transport, Wid};

child_entry!();

/// Fork `w`, check what its child reports, and return the child's pid.
fn fork_and_check(w: &mut Child, what: &str) -> i32 {
    let lines = w.cmd(Cmd::Fork { secs: 60 });
    let child = lines.iter().find_map(|l| l.strip_prefix("@@FORKCHILD ")).unwrap_or_else(|| {
        w.fail(&format!("{what}: no @@FORKCHILD line in {lines:?}"));
    });
    let parts: Vec<&str> = child.split('|').collect();
    let [pid, publish, batch, dispatch, flush, dropped] = parts[..] else {
        w.fail(&format!("{what}: malformed @@FORKCHILD {child:?}"));
    };
    assert!(publish.contains("fork without exec"), "{what}: publish in the fork child gave {publish:?}");
    assert!(batch.contains("fork without exec"), "{what}: a batch's publish in the fork child gave {batch:?}");
    assert!(dispatch.contains("created before a fork()"), "{what}: dispatch in the fork child gave {dispatch:?}");
    assert_eq!(flush, "not flushed", "{what}");
    assert_eq!(dropped, "dropped", "{what}");
    pid.parse().unwrap()
}

/// Kills the forked children when the test ends, whatever happens.
struct Reaper(Vec<i32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: signalling a pid this test forked (through its worker child).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn a_fork_child_keeps_neither_the_worker_id_nor_the_broker_role() {
    for transport in [Transport::SharedMemory, Transport::Socket] {
        let what = format!("{transport:?}");
        let dir = TempDir::new("fork");
        let wd = Watchdog::new("fork");
        let mut cfg = Cfg::new(&dir.sock(), 2);
        cfg.transport = transport;
        let mut reaper = Reaper(Vec::new());
        let mut w0 = wd.spawn(&cfg, Wid::Worker(0));
        let mut w1 = wd.spawn(&cfg, Wid::Worker(1));

        // A worker (not the broker) forks. Its child's copy refuses to run and its drop
        // leaves the parent's slot attached: the parent still receives.
        reaper.0.push(fork_and_check(&mut w1, &what));
        assert_eq!(w0.publish(Tgt::All, "s", "e", 0, 100).ok, 100, "{what}");
        w1.until(100);
        assert_eq!(w1.report().stats.get("lost").copied().unwrap_or(0), 0, "{what}");

        // Killed with its fork child alive: the id is free at once and the restarted worker
        // receives (before the fix: WidInUse for as long as the fork child lived).
        w1.kill();
        let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
        assert_eq!(w0.publish(Tgt::All, "s", "e", 100, 100).ok, 100, "{what}");
        w1.until(100);

        // The broker forks and is killed: the fork child keeps neither the broker role nor
        // the listener nor slot 0. The survivor becomes the broker and a restarted worker 0
        // attaches and receives.
        reaper.0.push(fork_and_check(&mut w0, &what));
        w0.kill();
        let mut w0 = wd.spawn(&cfg, Wid::Worker(0));
        assert_eq!(w1.publish(Tgt::All, "s", "e", 0, 50).ok, 50, "{what}");
        w0.until(50);
        for pid in &reaper.0 {
            // SAFETY: probing (signal 0) a pid this test forked.
            assert_eq!(unsafe { libc::kill(*pid, 0) }, 0, "{what}: the fork child {pid} must still be alive");
        }
    }
}
