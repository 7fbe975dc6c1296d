//! The harness of the multi-process tests: real worker processes, each this test binary
//! re-executed in the one child role (never `fork()` in the harness).
//!
//! | file         | responsibility                                                        |
//! |--------------|-----------------------------------------------------------------------|
//! | `cfg.rs`     | the key table: every value that crosses the process boundary, once    |
//! | `cmd.rs`     | the typed command grammar [`Cmd`], parsed and written in one place    |
//! | `role.rs`    | the one child role: its start, stdin loop and the commands' execution |
//! | `record.rs`  | what a child records of its events (list or run recorder)             |
//! | `report.rs`  | the one parser of a child's answers                                   |
//! | `child.rs`   | the parent's side: [`Watchdog`] spawns, [`Child`] talks and kills     |
//! | `raw.rs`     | a raw control-socket client (HELLO frames), in-process or as a child  |
//! | `cluster.rs` | failover: a set of children with the bookkeeping of its invariants    |
//! | `sockclient.rs` | raw peers passing descriptors, a fake socket broker, fd counts     |
//! | `region.rs`  | a child's shared-memory region, mapped through `/proc` as a hostile peer |
//! | `callback.rs` | the reactor: callbacks that publish (`Worker::subscribe_with`)        |
//! | `tokio_role.rs` | a worker driven by `AsyncWorker` on a current-thread runtime        |
//!
//! Clock, percentiles, rng, temp dirs and process plumbing come from the workspace's
//! `dev-support` crate. A test file starts with `#[macro_use] mod support; use support::*;`
//! and `child_entry!();`.

#![allow(dead_code, unused_imports)]

pub mod callback;
pub mod cfg;
pub mod child;
pub mod cluster;
pub mod cmd;
pub mod procfs;
pub mod raw;
pub mod record;
pub mod region;
pub mod report;
pub mod role;
pub mod sent;
pub mod sockclient;
pub mod tokio_role;
pub mod trace;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use cfg::{Cfg, Early, Runs, Spawn};
pub use child::{Child, Watchdog};
pub use cluster::Cluster;
pub use cmd::{Cmd, Item, Tgt};
pub use raw::{Hello, KIND_REJECT, KIND_WELCOME, Reply, hello_frame, layout_version, protocol_version, raw_exchange};
pub use report::{PubResult, Report};
use worker_events::{Transport, Wid, Worker};
pub use worker_events_dev_support::{Rng, Sample, TempDir, monotonic_ns};

/// Every test must finish within this bound (children are SIGKILLed after it).
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Set in a child's environment: run the child role (see [`role::child_main`]).
pub const CHILD_ENV: &str = "WE_CHILD";

/// Payload length of the `typed` command's array (and of the `typed` source's receivers).
pub const TYPED_LEN: usize = 1000;

/// The child role's test: `child_entry`, ignored so that a normal run skips it; it returns at
/// once in a process that is not a child.
#[macro_export]
macro_rules! child_entry {
    () => {
        #[test]
        #[ignore = "child process role, spawned by the other tests"]
        fn child_entry() {
            $crate::support::role::child_main();
        }
    };
}

thread_local! {
    /// The transport of the test running on this thread (see [`per_transport!`]).
    static TRANSPORT: std::cell::Cell<Transport> = const { std::cell::Cell::new(Transport::SharedMemory) };
}

/// The transport the current test runs on.
pub fn transport() -> Transport {
    TRANSPORT.with(|t| t.get())
}

/// Run `test` with `t` as the transport of every [`Cfg`] it builds (and its children).
pub fn run_with(t: Transport, test: fn()) {
    TRANSPORT.with(|c| c.set(t));
    test();
}

/// Turn each listed function into two tests, `shm::<name>` and `socket::<name>`: the whole
/// suite runs on both transports.
#[macro_export]
macro_rules! per_transport {
    ($($name:ident),* $(,)?) => {
        mod shm {
            $( #[test] fn $name() { $crate::support::run_with(worker_events::Transport::SharedMemory, super::$name) } )*
        }
        mod socket {
            $( #[test] fn $name() { $crate::support::run_with(worker_events::Transport::Socket, super::$name) } )*
        }
    };
}

/// The control socket's path in a test's directory.
pub trait SockPath {
    /// `<dir>/ev.sock`.
    fn sock(&self) -> PathBuf;
}

impl SockPath for TempDir {
    fn sock(&self) -> PathBuf {
        self.join("ev.sock")
    }
}

/// The byte pattern of a sized payload of `len` bytes (depends on the length too, so a
/// truncated or mixed-up payload does not pass).
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u64 * 31 + len as u64) % 251) as u8).collect()
}

/// Whether `b` is `pattern(b.len())`.
pub fn check_pattern(b: &[u8]) -> bool {
    let len = b.len() as u64;
    b.iter().enumerate().all(|(i, &x)| x == ((i as u64 * 31 + len) % 251) as u8)
}

/// "w3", "agent" or "none".
pub fn wid_str(w: Option<Wid>) -> String {
    match w {
        Some(Wid::Worker(n)) => format!("w{n}"),
        Some(Wid::PrivilegedAgent) => "agent".to_string(),
        None => "none".to_string(),
    }
}

/// start..start+n as a Vec.
pub fn seq(start: u64, n: u64) -> Vec<u64> {
    (start..start + n).collect()
}

/// Describe how `got` differs from `want` (for assertion messages without 10,000-number dumps).
pub fn diff_summary(got: &[u64], want: &[u64]) -> String {
    if got == want {
        return "equal".into();
    }
    let first_bad = got.iter().zip(want).position(|(a, b)| a != b);
    format!(
        "got {} items, want {}; first mismatch at index {:?} (got {:?}, want {:?})",
        got.len(),
        want.len(),
        first_bad,
        first_bad.map(|i| got[i]),
        first_bad.map(|i| want[i]),
    )
}

/// Drive an in-process worker until `done()` or the deadline.
pub fn pump_until(worker: &mut Worker, deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() {
        assert!(Instant::now() < deadline, "watchdog: in-process condition not reached before the deadline");
        worker.wait(Some(Duration::from_millis(5))).expect("wait");
    }
}

/// The system calls a thread sleeps in inside `epoll_wait`-style waits.
pub fn epoll_wait_syscalls() -> Vec<libc::c_long> {
    let mut v = vec![libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2];
    #[cfg(target_arch = "x86_64")]
    v.push(libc::SYS_epoll_wait);
    v
}

/// The system calls a thread sleeps in inside poll(2).
pub fn poll_syscalls() -> Vec<libc::c_long> {
    let mut v = vec![libc::SYS_ppoll];
    #[cfg(target_arch = "x86_64")]
    v.push(libc::SYS_poll);
    v
}

/// Is this process root (able to switch a child to another uid)?
pub fn is_root() -> bool {
    // SAFETY: plain syscall with no arguments.
    unsafe { libc::geteuid() == 0 }
}
