//! `Events::new` is cheap and fork-safe: it validates the options and opens nothing (no
//! descriptor, no file at or beside the socket path), so a prefork master can call it before
//! `fork()`. A worker in `testing` mode opens no socket, lock file or shared memory either:
//! its only descriptor is its own (empty) epoll set, the one `AsFd` hands out.
//!
//! One test in its own binary: it counts this process's descriptors, which a test running
//! in parallel would disturb.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::Path;

use worker_events::{Events, Options, Target, Wid};
use worker_events_dev_support::TempDir;

/// This process's open descriptors: number -> what they point to (without the handle on
/// `/proc/self/fd` that listing them takes).
fn fds() -> BTreeMap<i32, String> {
    let me = format!("/proc/{}/fd", std::process::id());
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .filter_map(|e| {
            let n: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?.to_string_lossy().into_owned();
            (target != me).then_some((n, target))
        })
        .collect()
}

/// The descriptors in `after` and not in `before`.
fn opened(before: &BTreeMap<i32, String>, after: &BTreeMap<i32, String>) -> BTreeMap<i32, String> {
    after.iter().filter(|(n, t)| before.get(n) != Some(t)).map(|(n, t)| (*n, t.clone())).collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn events_new_and_testing_mode_open_nothing() {
    let tmp = TempDir::new("opens-nothing");
    let dir = tmp.path().to_path_buf();
    let sock = dir.join("ev.sock");
    // A socket path whose directory does not exist: Events::new must not create it.
    let missing_dir = dir.join("not-created");
    let sock_in_missing = missing_dir.join("ev.sock");

    // Events::new: nothing opened, nothing created.
    let before = fds();
    let events = Events::new(Options::new(&sock).workers(4).enable_privileged_agent(true)).unwrap();
    let events2 = Events::new(Options::new(&sock_in_missing).workers(2)).unwrap();
    let clone = events.clone();
    let after = fds();
    assert!(opened(&before, &after).is_empty(), "Events::new opened {:?}", opened(&before, &after));
    assert!(entries(&dir).is_empty(), "Events::new created {:?} beside the socket path", entries(&dir));
    assert!(!missing_dir.exists(), "Events::new created the socket's directory");
    drop((events, events2, clone));

    // Testing mode: the worker's one descriptor is its own epoll set, with nothing in it;
    // no socket, lock file or region anywhere, however it is used.
    let before = fds();
    let events = Events::new(Options::new(&sock).workers(4).testing(true)).unwrap();
    let mut w = events.init_worker(Wid::Worker(3)).unwrap();
    let hits = std::sync::Arc::new(std::sync::Mutex::new(0u64));
    let h = hits.clone();
    w.subscribe("*", "*", move |_| *h.lock().unwrap() += 1);
    w.publish(Target::All, "s", "e", &1u64).unwrap();
    w.publish(Target::Unique("k"), "s", "e", &2u64).unwrap();
    w.publish_bytes(Target::Current, "s", "e", b"x").unwrap();
    assert_eq!(w.dispatch().unwrap(), 0);
    assert_eq!(w.wait(Some(std::time::Duration::from_millis(1))).unwrap(), 0);
    assert!(w.flush());
    assert_eq!(*hits.lock().unwrap(), 3, "testing mode runs the callbacks in publish");
    let after = fds();
    let new = opened(&before, &after);
    let own = w.as_raw_fd();
    assert_eq!(new.keys().copied().collect::<Vec<_>>(), vec![own], "testing mode opened {new:?}; its own fd is {own}");
    assert_eq!(new[&own], "anon_inode:[eventpoll]", "the worker's fd");
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{own}")).unwrap();
    assert!(!info.contains("tfd:"), "the testing worker's epoll set watches descriptors:\n{info}");
    assert!(entries(&dir).is_empty(), "testing mode created {:?} beside the socket path", entries(&dir));
    drop(w);
    drop(events);
    assert!(opened(&before, &fds()).is_empty(), "descriptors left open after drop: {:?}", opened(&before, &fds()));

    // For contrast, a real worker does create its files there (the test can see them).
    let events = Events::new(Options::new(&sock).workers(1)).unwrap();
    let w = events.init_worker(Wid::Worker(0)).unwrap();
    assert!(w.is_broker());
    assert_eq!(entries(&dir), vec!["ev.sock".to_string(), "ev.sock.lock".to_string()]);
    drop(w);
}
