//! Chaos (issue 11, tools): random SIGKILL, SIGSTOP and SIGCONT of random workers, the broker
//! included, for 60 cycles under a steady stream of `All` events from three publishers, on
//! each transport. Then, per publisher incarnation (`Cluster::finish_and_check`): received +
//! reported lost = published, no duplicates, in order, every restarted receiver resuming
//! where its predecessor stopped; and every worker attached to the one broker within
//! `cluster::SETTLE_WITHIN` (a worker resumed just before the end may still be re-attaching:
//! its broker was replaced while it was stopped, or it was that broker). And afterwards:
//! * no spin: every worker parked in `wait(None)` uses under a fifth of a CPU over a second
//!   (a spinning worker takes a whole one);
//! * nobody asleep with work: one more event, from a worker started last, wakes every parked
//!   worker (the child answers only once woken; the bound only detects "never").
//!
//! `WE_CHAOS_SEED=<n>` replays a run's choices (the seed is printed). `WE_CHILD_TRACE=1` has
//! every child print the library's log lines (INFO and above, `tests/support/trace.rs`),
//! which a failure of the final check then shows with the counts it found.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use support::cluster::Cluster;
use support::*;
use worker_events::Transport;

child_entry!();

/// One chaos run at a time: each runs six processes on a two-CPU machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const WORKERS: u32 = 5;
const CYCLES: usize = 60;

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces: the fields after it follow its closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn chaos(transport: Transport) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = Rng::from_env_or_clock("WE_CHAOS_SEED");
    let seed = rng.seed();
    eprintln!("chaos {transport:?}: seed {seed} (WE_CHAOS_SEED={seed} replays the choices)");
    // Slot WORKERS joins only at the end, to publish the event that must wake the others.
    let mut c = Cluster::new(
        &format!("chaos-{transport:?}"),
        |cfg| {
            cfg.transport = transport;
            cfg.max_queue_len = Some(1_000_000);
        },
        WORKERS + 1,
        &[1, 2, 3],
        5.0,
    );
    for s in 0..WORKERS {
        c.spawn(s);
    }
    for s in 0..WORKERS {
        c.start_stream(s);
    }
    let (mut kills, mut stops) = (0, 0);
    for _ in 0..CYCLES {
        let victim = rng.below(u64::from(WORKERS)) as u32;
        match rng.below(3) {
            0 => {
                c.kill(victim);
                kills += 1;
                std::thread::sleep(Duration::from_millis(rng.below(20)));
                c.spawn(victim);
                c.start_stream(victim);
            }
            action => {
                // Stopped briefly, or (one stop in four) for 0.8-1.1 s: long enough to be taken
                // for stuck when it is the broker on shared memory.
                c.stop(victim);
                stops += 1;
                let ms = if rng.below(4) == 0 { 800 + rng.below(300) } else { 20 + rng.below(280) };
                std::thread::sleep(Duration::from_millis(ms));
                if action == 2 && transport == Transport::SharedMemory {
                    // Meanwhile another worker dies and restarts (it must attach while the
                    // stopped one may be the broker).
                    let other = (victim + 1 + rng.below(u64::from(WORKERS) - 1) as u32) % WORKERS;
                    c.kill(other);
                    kills += 1;
                    c.spawn(other);
                    c.start_stream(other);
                }
                if rng.below(4) == 0 {
                    // Killed while stopped.
                    c.kill(victim);
                    kills += 1;
                    c.spawn(victim);
                    c.start_stream(victim);
                } else {
                    c.cont(victim);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(40)));
        assert!(c.wd.remaining() > Duration::from_secs(15), "too slow: {CYCLES} cycles did not fit the time budget");
    }
    eprintln!("chaos {transport:?}: {kills} kills, {stops} stops");
    let reports = c.finish_and_check();
    if transport == Transport::Socket {
        eprintln!(
            "chaos Socket: {} events reported lost; {} events before a restarted receiver's first of a run went \
             unreported (they died with a broker before the receiver saw the publisher)",
            c.socket_losses, c.socket_unreported_prefix
        );
    }

    // Park every worker in wait(None) until one more event than it has now.
    let live = c.live();
    for &s in &live {
        let r = &reports[&s];
        let n = r.stat("events") + r.stat("lost_total") + 1;
        c.proc(s).send(Cmd::Park { n });
        let l = c.proc(s).next_line_within(Duration::from_secs(10), "@@PARKING");
        assert_eq!(l, "@@PARKING", "w{s}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let pids: Vec<(u32, u32)> = live.iter().map(|&s| (s, c.proc(s).pid())).collect();
    let before: Vec<u64> = pids.iter().map(|&(_, p)| cpu_ticks(p)).collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let wall_ticks = t0.elapsed().as_secs_f64() * 100.0;
    for (i, &(s, p)) in pids.iter().enumerate() {
        let used = cpu_ticks(p) - before[i];
        assert!(
            (used as f64) < wall_ticks / 5.0,
            "{transport:?}: w{s} parked in wait(None) with nothing to do used {used} of {wall_ticks:.0} CPU ticks: spinning"
        );
    }

    // One more event from a worker that joins now: every parked worker wakes.
    c.spawn(WORKERS);
    c.proc(WORKERS).cmd(Cmd::RunBurst { n: 1 });
    for &s in &live {
        let l = c.proc(s).next_line_within(Duration::from_secs(20), "@@PARKED after one more event");
        assert!(l.starts_with("@@PARKED"), "{transport:?}: w{s}: {l}");
        c.proc(s).expect_ok();
    }
}

#[test]
fn chaos_shared_memory() {
    chaos(Transport::SharedMemory);
}

#[test]
fn chaos_socket() {
    chaos(Transport::Socket);
}
