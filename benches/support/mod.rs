//! What both multi-process benches share: re-executing the bench binary in a child role,
//! pinning, reaping, criterion's command-line filter ([`wanted`]), the [`scenario`] table
//! runner, the self-timed [`summary`] and its per-hop histograms ([`hops`]). The generic
//! helpers (clock, percentiles, temp dirs, processes) live in the `worker-events-dev-support`
//! crate.
//! (Each bench uses a subset; the rest is not dead code in the other one.)
#![allow(dead_code)]

pub mod hops;
pub mod scenario;
pub mod shm;
pub mod summary;

use std::os::fd::RawFd;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use worker_events_dev_support::process::{self, allowed_cpus, pin_to_cpu};

/// The child's role; set means "run as a child", checked first thing in `main`.
pub const ROLE_ENV: &str = "WE_BENCH_ROLE";
/// The CPU the child pins itself to.
pub const CPU_ENV: &str = "WE_BENCH_CPU";
/// The control socket path of the library's children.
pub const SOCK_ENV: &str = "WE_BENCH_SOCK";

/// Pin this process to `cpu`, or say why not.
pub fn pin(cpu: usize) {
    if let Err(e) = pin_to_cpu(cpu) {
        eprintln!("sched_setaffinity({cpu}) failed: {e}");
    }
}

/// Pin the bench process to the first allowed CPU and return the second one for the
/// child (None, and no pinning, with a single CPU).
pub fn pin_pair() -> Option<usize> {
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        eprintln!("only one CPU available: not pinning");
        return None;
    }
    pin(cpus[0]);
    eprintln!("pinning: bench process on CPU {}, peer process on CPU {}", cpus[0], cpus[1]);
    Some(cpus[1])
}

/// The command re-executing this binary in `role`, pinned to `cpu`, inheriting `fds`.
pub fn child_command(role: &str, cpu: Option<usize>, fds: &[RawFd], sock: Option<&Path>) -> Command {
    let mut cmd = process::reexec().expect("current_exe");
    cmd.env(ROLE_ENV, role);
    if let Some(c) = cpu {
        cmd.env(CPU_ENV, c.to_string());
    }
    if let Some(s) = sock {
        cmd.env(SOCK_ENV, s);
    }
    process::inherit_fds(&mut cmd, fds);
    cmd
}

/// First thing in a child: die with the bench process, refuse to run under another
/// parent, pin to the CPU it was given. Returns the inherited descriptors.
pub fn child_prologue() -> Vec<RawFd> {
    if process::die_with_parent().is_err() {
        std::process::exit(1);
    }
    if let Some(cpu) = std::env::var(CPU_ENV).ok().and_then(|s| s.parse().ok()) {
        pin(cpu);
    }
    process::inherited_fds()
}

/// Wait for `child` to exit (up to 5 s), then kill it.
pub fn reap(child: &mut Child) {
    match process::reap(child, Duration::from_secs(5)) {
        Some(st) if !st.success() => eprintln!("peer process exited with {st}"),
        Some(_) => {}
        None => eprintln!("peer process did not exit; killed it"),
    }
}

/// Whether the benchmark `id` passes the filter given on the command line
/// (`cargo bench --bench NAME -- FILTER`, a substring as for criterion).
pub fn wanted(id: &str) -> bool {
    // Options of criterion's command line that take a value.
    const WITH_VALUE: &[&str] = &[
        "-s",
        "--save-baseline",
        "-b",
        "--baseline",
        "--load-baseline",
        "-c",
        "--color",
        "--output-format",
        "--plotting-backend",
        "--profile-time",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--format",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if WITH_VALUE.contains(&a) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return id.contains(a);
        }
    }
    true
}

/// Whether criterion runs in its test mode (`cargo test --benches`: each bench once, no
/// `--bench` argument); the benches then skip their self-timed summaries.
pub fn criterion_test_mode() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// Dispatch `w` until `done()`: busy (`dispatch`) or parked (`wait`, 50 ms at a time), for at
/// most `limit` (a peer that stopped answering fails the bench instead of hanging it).
pub fn serve_until(w: &mut worker_events::Worker, busy: bool, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        if busy {
            w.dispatch().expect("dispatch");
        } else {
            w.wait(Some(Duration::from_millis(50))).expect("wait");
        }
        assert!(std::time::Instant::now() < deadline, "the peer process did not answer");
    }
}
