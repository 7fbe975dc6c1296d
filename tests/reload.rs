//! Graceful reload (issue 11, item 14), with two real generations of worker processes.
//!
//! The model (`Options::generation`): each generation is its own deployment, with its own
//! socket, lock file, broker and region. A new generation starts with the same worker ids
//! while the old one still runs and drains; each keeps exchanging events among its own
//! workers, neither sees the other's, and once the old one has exited its files are removed.

#[macro_use]
mod support;

use support::*;
use worker_events::{Events, Transport, Wid};

child_entry!();

/// The (source, event) pairs a worker received, with the payloads of each.
fn received(w: &mut Child) -> Vec<(String, String, Vec<u64>)> {
    w.report().streams.into_iter().map(|((_, s, e), v)| (s, e, v)).collect()
}

#[test]
fn a_new_generation_starts_while_the_old_one_drains() {
    for transport in [Transport::SharedMemory, Transport::Socket] {
        let what = format!("{transport:?}");
        let dir = TempDir::new("reload");
        let wd = Watchdog::new("reload");
        let mut g1 = Cfg::new(&dir.sock(), 2);
        g1.transport = transport;
        g1.generation = Some(1);
        let mut g2 = g1.clone();
        g2.generation = Some(2);

        let mut old0 = wd.spawn(&g1, Wid::Worker(0));
        let mut old1 = wd.spawn(&g1, Wid::Worker(1));
        assert_eq!(old0.publish(Tgt::All, "cfg", "v1", 0, 100).ok, 100, "{what}");
        old1.until(100);

        // Without a new generation number, the same ids are held by the running generation:
        // this is what a reload got before (and still gets on one socket path).
        let refused = wd.spawn_expect_err(&g1, Wid::Worker(0));
        assert!(refused.contains("already held by another live process"), "{what}: {refused}");

        // Reload: the new generation starts with the same ids while the old one runs.
        let mut new0 = wd.spawn(&g2, Wid::Worker(0));
        let mut new1 = wd.spawn(&g2, Wid::Worker(1));
        let status = new0.cmd(Cmd::Status);
        assert!(status[0].starts_with("@@STATUS 1 1"), "{what}: the new generation elects its own broker: {status:?}");
        assert_eq!(new0.publish(Tgt::All, "cfg", "v2", 0, 100).ok, 100, "{what}");
        assert_eq!(old0.publish(Tgt::All, "cfg", "v1", 100, 100).ok, 100, "{what}");
        new1.until(100);
        old1.until(200);
        let seq = |n: u64| (0..n).collect::<Vec<u64>>();
        assert_eq!(received(&mut new1), vec![("cfg".into(), "v2".into(), seq(100))], "{what}: new generation");
        assert_eq!(received(&mut old1), vec![("cfg".into(), "v1".into(), seq(200))], "{what}: old generation");

        // The old generation's files stay while any of it runs, and go once it has exited.
        let old = Events::new(g1.options()).unwrap();
        let files = |c: &Cfg| {
            let p = c.options().socket_path();
            let mut lock = p.clone().into_os_string();
            lock.push(".lock");
            [p, lock.into()].into_iter().filter(|f| f.exists()).count()
        };
        assert!(!old.remove_files().unwrap(), "{what}: generation 1 still runs");
        old0.exit();
        assert!(!old.remove_files().unwrap(), "{what}: worker 1 of generation 1 still runs");
        // Worker 1 takes the broker role over (it binds the socket anew: for a moment there is
        // no file at the path); once it serves, both files are there.
        let limit = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !old1.cmd(Cmd::Status)[0].starts_with("@@STATUS 1 1") {
            assert!(std::time::Instant::now() < limit, "{what}: worker 1 of generation 1 never took the broker role");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(files(&g1), 2, "{what}");
        old1.exit();
        assert!(old.remove_files().unwrap(), "{what}: generation 1 has exited");
        assert_eq!(files(&g1), 0, "{what}: generation 1's socket and lock file are removed");
        assert_eq!(files(&g2), 2, "{what}: generation 2's files are untouched");

        // The new generation is unaffected.
        assert_eq!(new1.publish(Tgt::All, "cfg", "v2", 0, 50).ok, 50, "{what}");
        new0.until(50);
    }
}
