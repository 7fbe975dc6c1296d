//! The live inspector (`worker_events::inspect`, issue 12 item 8) against real worker
//! processes: what a snapshot shows (slots, pids, liveness, broker and epoch, ring depths
//! equal to the workers' own `stats()`, the dedup table's fill), that it takes no worker
//! slot, and that an inspector of another uid is refused by the broker.

#[macro_use]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use worker_events::{Snapshot, Transport, Wid, inspect};

child_entry!();

/// Environment of the inspector child role ([`inspector_child`]): the socket to inspect.
const INSPECT_SOCK_ENV: &str = "WE_INSPECT_SOCK";
/// ... and the uid (and gid) to switch to first.
const INSPECT_UID_ENV: &str = "WE_INSPECT_UID";

/// The inspector child role: switch uid, call `inspect`, print `@@INSPECTED <slots>` or
/// `@@INSPECT_ERR <error>`. Returns at once in any other process.
#[test]
#[ignore = "child process role, spawned by an_inspector_of_another_uid_is_refused"]
fn inspector_child() {
    let Ok(sock) = std::env::var(INSPECT_SOCK_ENV) else { return };
    if let Ok(uid) = std::env::var(INSPECT_UID_ENV) {
        let uid: u32 = uid.parse().unwrap();
        // SAFETY: plain syscalls in a single-threaded test process (the harness runs this
        // one test): groups, then group, then user.
        let ok =
            unsafe { libc::setgroups(0, std::ptr::null()) == 0 && libc::setgid(uid) == 0 && libc::setuid(uid) == 0 };
        assert!(ok, "cannot switch to uid {uid}: {}", std::io::Error::last_os_error());
    }
    match inspect(&sock) {
        Ok(s) => println!("@@INSPECTED {}", s.slots.len()),
        Err(e) => println!("@@INSPECT_ERR {e}"),
    }
}

/// Inspect `sock` from this process (the children are the deployment).
fn snap(sock: &std::path::Path) -> Snapshot {
    inspect(sock).unwrap_or_else(|e| panic!("inspect failed: {e}"))
}

/// Sum of the depths of every ring into `to`.
fn inbound(s: &Snapshot, to: Wid) -> u64 {
    s.rings.iter().filter(|r| r.to == to).map(|r| r.depth).sum()
}

/// Three workers with traffic and a paused receiver: the snapshot shows every slot alive with
/// its child's pid, the broker and its epoch, the paused receiver's inbound rings holding
/// exactly what its own `stats()` reports (nonzero), and one live dedup entry per distinct
/// unique hash; after the broker is killed, the new broker and the next epoch.
fn a_snapshot_shows_slots_broker_depths_and_dedup_fill() {
    let dir = TempDir::new("inspect");
    let wd = Watchdog::new("inspect");
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.unique_timeout_ms = Some(60_000);
    let mut w = [wd.spawn(&cfg, Wid::Worker(0)), wd.spawn(&cfg, Wid::Worker(1)), wd.spawn(&cfg, Wid::Worker(2))];
    let shm = transport() == Transport::SharedMemory;
    w[2].cmd(Cmd::Pause);
    let r = w[1].publish(Tgt::All, "s", "e", 0, 50);
    assert_eq!((r.ok, r.err), (50, 0));
    let r = w[1].cmd(Cmd::uniq("u", "e", "h", 0, 20));
    assert!(r.iter().any(|l| l == "@@PUB 20 0"), "{r:?}");
    // The same hashes again: duplicates, dropped, no new entry.
    let r = w[0].cmd(Cmd::uniq("u", "e", "h", 0, 5));
    assert!(r.iter().any(|l| l == "@@PUB 5 0"), "{r:?}");
    w[0].until(50);

    let s = snap(&dir.sock());
    println!("{s}");
    let broker = (0..3).find(|&i| w[i].report().stat("is_broker") == 1).expect("a broker");
    assert_eq!(s.broker, Wid::Worker(broker as u32));
    assert_eq!(s.broker_pid, w[broker].pid());
    assert!(s.epoch >= 1, "{}", s.epoch);
    assert_eq!((s.workers, s.agent, s.slots.len()), (3, false, 3));
    for (i, c) in w.iter().enumerate() {
        let slot = s.slot(Wid::Worker(i as u32)).unwrap();
        assert!(slot.alive, "slot {i}: {slot:?}");
        assert_eq!(slot.pid, Some(c.pid()), "slot {i}: the pid the kernel reported for the child");
        assert_eq!(slot.broker, i == broker);
        assert_eq!(slot.attaches, shm.then_some(1), "slot {i}");
    }
    if shm {
        assert_eq!(s.rings.len(), 6, "every ordered pair of distinct slots");
        // The stream is stopped: the paused receiver's rings hold exactly what it reports.
        let depth = w[2].report().stat("inbound_depth_sum");
        assert!(depth >= 50, "50 All events wait for the paused receiver (stats say {depth})");
        assert_eq!(inbound(&s, Wid::Worker(2)), depth, "the snapshot's depth is the receiver's own");
        assert!(s.ring(Wid::Worker(1), Wid::Worker(2)).unwrap().depth >= 50);
        assert_eq!(s.ring(Wid::Worker(2), Wid::Worker(0)).unwrap().depth, 0, "w2 published nothing");
        assert!(s.rings.iter().all(|r| r.lost == 0 && r.lost_reported == 0), "{:?}", s.rings);
        let d = s.dedup.expect("shared memory has a dedup table");
        assert_eq!(d.live, 20, "one live entry per distinct unique hash: {d:?}");
        assert_eq!(d.duplicates, 5, "{d:?}");
        assert!(d.entries >= 40, "{d:?}");
        // The receiver drains: its rings empty, which the next snapshot shows.
        w[2].cmd(Cmd::Resume);
        w[2].until(50);
        assert_eq!(w[2].cmd(Cmd::Drain { ms: 10_000 }).last().map(String::as_str), Some("@@DRAINED reached"));
        let consumed = s.ring(Wid::Worker(1), Wid::Worker(2)).unwrap().consumed;
        let s2 = snap(&dir.sock());
        assert_eq!(inbound(&s2, Wid::Worker(2)), 0, "drained");
        assert!(s2.ring(Wid::Worker(1), Wid::Worker(2)).unwrap().consumed >= consumed + 50);

        // Wake-ups: every eventfd write a publisher made is counted in the woken slot's
        // header (nothing runs now: the counts are still).
        let sent: u64 = w.iter_mut().map(|c| c.report().stat("wakeups_sent")).sum();
        let s3 = snap(&dir.sock());
        let counted: u64 = s3.slots.iter().map(|sl| sl.wakeups.expect("shared memory counts wake-ups")).sum();
        assert_eq!(counted, sent, "wake-ups in the slot headers vs the publishers' own counts: {:?}", s3.slots);
        // A receiver asleep in `wait` is woken by the next event, and the count shows it.
        let w2 = Wid::Worker(2);
        let before = s3.slot(w2).unwrap().wakeups.unwrap();
        let r2 = w[2].report();
        let got = r2.stat("events") + r2.stat("lost_total");
        let mut woken = false;
        for got in got + 1..got + 21 {
            w[2].send(Cmd::Until { n: got, ms: 10_000 });
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !snap(&dir.sock()).slot(w2).unwrap().parked {
                assert!(std::time::Instant::now() < deadline, "worker 2 never parked in its wait");
                std::thread::sleep(Duration::from_millis(5));
            }
            let r = w[1].publish(Tgt::All, "s", "e", 0, 1);
            assert_eq!((r.ok, r.err), (1, 0));
            let lines = w[2].expect_ok();
            assert!(lines.iter().any(|l| l == "@@UNTIL reached"), "{lines:?}");
            // (It may have woken on its own timer between the check and the publish.)
            if snap(&dir.sock()).slot(w2).unwrap().wakeups.unwrap() > before {
                woken = true;
                break;
            }
        }
        assert!(woken, "20 events to a parked worker 2, no wake-up counted");
    } else {
        assert!(s.rings.is_empty() && s.dedup.is_none(), "the socket transport has no shared rings");
        assert!(s.slots.iter().all(|sl| sl.wakeups.is_none()), "no slot headers on the socket transport");
        // The broker's data queue per worker: none for its own slot, one for each other.
        for sl in &s.slots {
            assert_eq!(sl.broker_queue.is_some(), !sl.broker, "{sl:?}");
        }
        if broker != 2 {
            // The paused receiver's socket buffer fills: the rest waits in the broker's queue
            // for it, which the snapshot shows (frames and bytes).
            for _ in 0..10 {
                let r = w[1].cmd(Cmd::Bytes { target: Tgt::All, src: "s".into(), ev: "big".into(), len: 60_000 });
                assert!(r.iter().any(|l| l == "@@PUB 1 0"), "{r:?}");
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let (frames, bytes) = loop {
                let q = snap(&dir.sock()).slot(Wid::Worker(2)).unwrap().broker_queue.expect("a queue for worker 2");
                if q.1 >= 60_000 {
                    break q;
                }
                assert!(std::time::Instant::now() < deadline, "600 kB for a paused worker, broker queue {q:?}");
                std::thread::sleep(Duration::from_millis(10));
            };
            assert!((1..=10).contains(&frames) && bytes <= 10 * 60_100, "({frames}, {bytes})");
        }
    }

    // Kill the broker: the next snapshot shows its successor and the next epoch.
    let [w0, w1, w2] = w;
    let mut rest = match broker {
        0 => {
            w0.kill();
            vec![(1, w1), (2, w2)]
        }
        1 => {
            w1.kill();
            vec![(0, w0), (2, w2)]
        }
        _ => {
            w2.kill();
            vec![(0, w0), (1, w1)]
        }
    };
    let mut next = None;
    for _ in 0..500 {
        match inspect(dir.sock()) {
            Ok(n) if n.epoch > s.epoch => {
                next = Some(n);
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let n = next.expect("a new broker within 10 s");
    assert_eq!(n.epoch, s.epoch + 1, "one election");
    let (_, nb) = rest.iter_mut().find(|(i, _)| n.broker == Wid::Worker(*i)).expect("a survivor is the broker");
    assert_eq!(n.broker_pid, nb.pid());
    let dead = n.slot(Wid::Worker(broker as u32)).unwrap();
    assert!(!dead.alive && dead.pid.is_none(), "the killed broker's slot: {dead:?}");
}

/// The inspector takes no slot: while an inspector keeps inspecting, workers take every id
/// of the deployment, and the snapshots see them.
fn the_inspector_takes_no_slot() {
    let dir = TempDir::new("inspect-noslot");
    let wd = Watchdog::new("inspect-noslot");
    let cfg = Cfg::new(&dir.sock(), 2);
    let w0 = wd.spawn(&cfg, Wid::Worker(0));
    // (stop, inspections that succeeded)
    let state = Arc::new(Mutex::new((false, 0u64)));
    let sock = dir.sock();
    let st = state.clone();
    let inspector = std::thread::spawn(move || {
        let mut last = None;
        while !st.lock().unwrap().0 {
            if let Ok(s) = inspect(&sock) {
                st.lock().unwrap().1 += 1;
                last = Some(s);
            }
        }
        last
    });
    let done = || state.lock().unwrap().1;
    while done() < 3 {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The last id, taken while inspections run.
    let w1 = wd.spawn(&cfg, Wid::Worker(1));
    let before = done();
    while done() < before + 3 {
        std::thread::sleep(Duration::from_millis(5));
    }
    state.lock().unwrap().0 = true;
    let last = inspector.join().unwrap().expect("snapshots");
    for (i, c) in [&w0, &w1].into_iter().enumerate() {
        let slot = last.slot(Wid::Worker(i as u32)).unwrap();
        assert!(slot.alive && slot.pid == Some(c.pid()), "slot {i}: {slot:?}");
    }
    // Every id is taken: a third worker of either id is refused.
    let e = wd.spawn_expect_err(&cfg, Wid::Worker(1));
    assert!(e.contains("already held"), "{e}");
}

/// An inspector running as another uid is refused by the broker (`SO_PEERCRED`), as a
/// worker would be. Needs root (to run the inspector as uid 65534): skipped otherwise.
fn an_inspector_of_another_uid_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED an_inspector_of_another_uid_is_refused: not running as root (cannot switch uid)");
        return;
    }
    let dir = TempDir::new("inspect-uid");
    let wd = Watchdog::new("inspect-uid");
    let cfg = Cfg::new(&dir.sock(), 2);
    let _w0 = wd.spawn(&cfg, Wid::Worker(0));
    // File permissions are the first barrier; open them so that the one under test is the
    // broker's credential check.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.sock(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = |uid: Option<u32>| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "inspector_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env(INSPECT_SOCK_ENV, dir.sock());
        if let Some(uid) = uid {
            cmd.env(INSPECT_UID_ENV, uid.to_string());
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // The harness prints the test's name on the same line.
        let answer = text.lines().find_map(|l| l.find("@@INSPECT").map(|i| l[i..].to_string()));
        answer.unwrap_or_else(|| panic!("no answer: {text}"))
    };
    assert_eq!(run(Some(65534)), "@@INSPECT_ERR attach refused by the broker: uid 65534 is not allowed to attach");
    assert_eq!(run(None), "@@INSPECTED 2", "the same inspector of our own uid");
}

per_transport!(
    a_snapshot_shows_slots_broker_depths_and_dedup_fill,
    the_inspector_takes_no_slot,
    an_inspector_of_another_uid_is_refused,
);
