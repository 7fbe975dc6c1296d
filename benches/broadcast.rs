//! The broadcast ring (`src/ring/mcast.rs`, the building block for the per-publisher topology
//! of issue 10; `ARCHITECTURE.md` §P, P3 and P5) against bare SPSC rings, in one run:
//!
//! 1. **1 -> 1 rate**: the bare SPSC ring of `benches/latency.rs` (64-byte slots, index
//!    published per message) vs the broadcast ring with 64-byte bodies (128-byte records: a
//!    24-byte header) and with 40-byte bodies (one 64-byte record).
//! 2. **1 -> 3 broadcast**: the publisher's rate with three reader processes keeping up: three
//!    bare SPSC rings written per message (today's per-pair topology's cost model: one copy per
//!    receiver) vs one broadcast ring written once.
//! 3. **Region bytes** for 4, 16 and 64 workers: today's per-pair rings (`Geometry`) vs one
//!    broadcast ring per publisher (computed, not measured).
//!
//! Every producer paces itself so that no reader is lapped (`would_lap` on the broadcast
//! ring, the cached tail on the bare rings): both sides move every message to every reader.
//! Rates are messages per second at the publisher, from when the first is written until every
//! reader has released the last; each side runs in alternating rounds with fresh reader
//! processes (`support::summary::alternate`), and the ratio is the median of the per-round
//! ratios. With two CPUs, the publisher is pinned to one and the readers share the other
//! (idle readers yield when they share a CPU).
//!
//! Run: `cargo bench --features fuzzing --bench broadcast` (`-- --quick` for fewer rounds).

// The bare-ring baseline is process-private atomics over a plain mmap (as in latency.rs).
#![allow(clippy::disallowed_types)]

mod support;

use std::hint::black_box;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::shm::Shm;
use support::summary::{Compared, alternate};
use support::{ROLE_ENV, child_command, child_prologue, pin_pair, reap};
use worker_events::fuzz_api::{self, McastRing};
use worker_events_dev_support::loadavg;
use worker_events_dev_support::process::allowed_cpus;

/// Bare rings: per ring `k`, head at `k * 256`, tail at `k * 256 + 128`; slots from `SLOTS_OFF
/// + k * RING_BYTES`, 2048 slots of 64 bytes (128 KiB, the library's default ring capacity).
const SLOT_COUNT: u64 = 2048;
const RING_BYTES: usize = 2048 * 64;
const SLOTS_OFF: usize = 4096;
/// The stop word (both kinds of scenario).
const OFF_STOP: usize = 2048;
/// The broadcast ring: at `MCAST_OFF`, a 128 KiB data area (as the bare ring's).
const MCAST_OFF: usize = 4096;
const MCAST_CAP: usize = 128 * 1024;
/// Default capacity assumed for per-publisher rings in the region-size table.
const MCAST_REGION_CAP: usize = 512 * 1024;
const SHM_LEN: usize = SLOTS_OFF + 3 * RING_BYTES;

const IDX_ENV: &str = "WE_BENCH_IDX";
const READERS_ENV: &str = "WE_BENCH_READERS";
const BODY_ENV: &str = "WE_BENCH_BODY";

fn main() {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        child_main(&role);
        std::process::exit(0);
    }
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --benches`: nothing to check here
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, chunks, chunk) = if quick { (3, 5, 100_000) } else { (7, 10, 200_000) };
    let ncpus = allowed_cpus().len();
    let child_cpu = pin_pair();
    let load_before = loadavg();

    let one = alternate(rounds, 3, true, |side| match side {
        0 => Bare::round(1, child_cpu, chunks, chunk),
        1 => Mcast::round(1, 64, child_cpu, chunks, chunk),
        _ => Mcast::round(1, 40, child_cpu, chunks, chunk),
    });
    let three = alternate(rounds, 2, true, |side| match side {
        0 => Bare::round(3, child_cpu, chunks, chunk / 4),
        _ => Mcast::round(3, 64, child_cpu, chunks, chunk / 4),
    });

    println!();
    println!("==== broadcast ring summary: {} CPUs, publisher pinned apart from the readers ====", ncpus);
    println!("load average before: {load_before}  after: {}", loadavg());
    println!(
        "{rounds} alternating rounds x {chunks} chunks; rates in M messages/s; ratio = median of per-round ratios"
    );
    let row = |label: &str, c: &Compared| {
        println!("  {label:<52} median {:>7.2}  p90 {:>7.2}  ratio {:>5.2}x", c.all.median, c.all.best, c.ratio)
    };
    println!("1 -> 1 rate (P3):");
    row("bare SPSC ring, 64-byte slots, index per message", &one[0]);
    row("broadcast ring, 64-byte body (128-byte record)", &one[1]);
    row("broadcast ring, 40-byte body (64-byte record)", &one[2]);
    println!("1 -> 3 broadcast, publisher rate, readers keeping up (P3):");
    row("three bare SPSC rings, one copy per reader", &three[0]);
    row("one broadcast ring, 64-byte body, written once", &three[1]);
    println!(
        "region bytes (P5), per-pair rings at 128 KiB (the default up to 19 slots) vs one {} KiB ring per publisher:",
        MCAST_REGION_CAP / 1024
    );
    for n in [4u32, 16, 64] {
        let (today, mcast) = region_bytes(n);
        println!("  {n:>2} workers: per-pair {:>8.1} MiB   per-publisher {:>6.1} MiB", mib(today), mib(mcast));
    }
}

fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// The region with 128 KiB per-pair rings (`Geometry`; the default up to 19 slots) and the same region with its per-pair rings
/// replaced by one broadcast ring per publisher (`MCAST_REGION_CAP`, page-aligned each).
fn region_bytes(workers: u32) -> (usize, usize) {
    let g = fuzz_api::Geometry::new(workers, false, 128 * 1024, 65_536);
    let (first, second) = (g.ring_offset(0, 0).expect("slot 0"), g.ring_offset(0, 1).expect("slot 1"));
    let pair_rings = (second - first) * (workers as usize).pow(2);
    let one = fuzz_api::mcast_ring_bytes(workers as usize, MCAST_REGION_CAP).next_multiple_of(4096);
    (g.region_size(), g.region_size() - pair_rings + workers as usize * one)
}

/// Spawn `readers` reader processes of `role` over `shm`.
fn spawn_readers(role: &str, shm: &Shm, readers: usize, body: usize, cpu: Option<usize>) -> Vec<Child> {
    (0..readers)
        .map(|i| {
            let mut cmd = child_command(role, cpu, &[shm.raw_fd()], None);
            cmd.env(IDX_ENV, i.to_string()).env(READERS_ENV, readers.to_string()).env(BODY_ENV, body.to_string());
            cmd.spawn().expect("spawning a reader process")
        })
        .collect()
}

fn stop(shm: &Shm, children: &mut [Child]) {
    shm.word(OFF_STOP).store(1, Ordering::Release);
    children.iter_mut().for_each(reap);
}

/// Time `chunks` chunks of `chunk` messages (after a warm-up chunk); rates in M/s.
fn timed(chunks: usize, chunk: u64, mut run: impl FnMut(u64) -> Duration) -> Vec<f64> {
    run(chunk / 4);
    (0..chunks).map(|_| chunk as f64 / run(chunk).as_secs_f64() / 1e6).collect()
}

fn env_usize(name: &str) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).expect(name)
}

fn child_main(role: &str) {
    let fds = child_prologue();
    let shm = Shm::inherited(&fds, SHM_LEN);
    let (idx, readers, body) = (env_usize(IDX_ENV), env_usize(READERS_ENV), env_usize(BODY_ENV));
    match role {
        "bare-sink" => Bare::sink(&shm, idx, readers > 1),
        "mcast-sink" => Mcast::sink(&shm, idx, readers, body),
        _ => panic!("unknown role {role}"),
    }
}

/// Idle: spin alone on a CPU, yield when sharing it.
fn idle(shared_cpu: bool) {
    if shared_cpu { std::thread::yield_now() } else { std::hint::spin_loop() }
}

// ---------------------------------------------------------------------------------------
// Baseline: bare SPSC rings of 64-byte slots, index published per message (latency.rs)

struct Bare;

impl Bare {
    fn head(shm: &Shm, k: usize) -> &AtomicU64 {
        shm.word(k * 256)
    }

    fn tail(shm: &Shm, k: usize) -> &AtomicU64 {
        shm.word(k * 256 + 128)
    }

    fn slot(shm: &Shm, k: usize, i: u64) -> *mut u8 {
        shm.slot(SLOTS_OFF + k * RING_BYTES + (i % SLOT_COUNT) as usize * 64)
    }

    fn round(readers: usize, cpu: Option<usize>, chunks: usize, chunk: u64) -> Vec<f64> {
        let shm = Shm::create(SHM_LEN);
        let mut children = spawn_readers("bare-sink", &shm, readers, 64, cpu);
        let (mut head, mut cached) = (0u64, vec![0u64; readers]);
        let mut msg = [0x5au8; 64];
        let rates = timed(chunks, chunk, |n| {
            let t = Instant::now();
            for _ in 0..n {
                msg[..8].copy_from_slice(&head.to_le_bytes());
                for (k, c) in cached.iter_mut().enumerate() {
                    while head - *c >= SLOT_COUNT {
                        std::hint::spin_loop();
                        *c = Bare::tail(&shm, k).load(Ordering::Acquire);
                    }
                    // SAFETY: the slot is free (head - tail < SLOT_COUNT) and in bounds; only this
                    // process writes it until the Release store below publishes it.
                    unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), Bare::slot(&shm, k, head), 64) };
                    Bare::head(&shm, k).store(head + 1, Ordering::Release);
                }
                head += 1;
            }
            for k in 0..readers {
                while Bare::tail(&shm, k).load(Ordering::Acquire) != head {
                    std::hint::spin_loop();
                }
            }
            t.elapsed()
        });
        stop(&shm, &mut children);
        rates
    }

    fn sink(shm: &Shm, k: usize, shared_cpu: bool) {
        let (head_w, tail_w, stop) = (Bare::head(shm, k), Bare::tail(shm, k), shm.word(OFF_STOP));
        let (mut tail, mut sum) = (0u64, 0u64);
        loop {
            let head = head_w.load(Ordering::Acquire);
            if head == tail {
                if stop.load(Ordering::Acquire) != 0 {
                    black_box(sum);
                    return;
                }
                idle(shared_cpu);
                continue;
            }
            while tail < head {
                let mut m = [0u8; 64];
                // SAFETY: published slot (tail < head, Acquire above), not rewritten before
                // we release it; plain bytes.
                unsafe { std::ptr::copy_nonoverlapping(Bare::slot(shm, k, tail), m.as_mut_ptr(), 64) };
                sum = sum.wrapping_add(u64::from_le_bytes(black_box(m)[..8].try_into().expect("8 bytes")));
                tail += 1;
            }
            tail_w.store(tail, Ordering::Release);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The broadcast ring: one producer, `readers` reader processes

struct Mcast;

impl Mcast {
    fn ring(shm: &Shm, readers: usize) -> McastRing {
        assert!(MCAST_OFF + fuzz_api::mcast_ring_bytes(readers, MCAST_CAP) <= SHM_LEN);
        // SAFETY: MCAST_OFF is page-aligned inside the mapping, which holds the ring's bytes
        // (asserted) and outlives every use here; all processes use only the mcast API on it.
        unsafe { McastRing::from_raw(shm.slot(MCAST_OFF), readers, MCAST_CAP) }.expect("aligned ring")
    }

    fn round(readers: usize, body: usize, cpu: Option<usize>, chunks: usize, chunk: u64) -> Vec<f64> {
        let shm = Shm::create(SHM_LEN);
        let ring = Mcast::ring(&shm, readers);
        let mut p = ring.producer().expect("fresh ring");
        let mut children = spawn_readers("mcast-sink", &shm, readers, body, cpu);
        let mut msg = vec![0x5au8; body];
        let rates = timed(chunks, chunk, |n| {
            let t = Instant::now();
            for _ in 0..n {
                while p.would_lap(body) {
                    std::hint::spin_loop();
                }
                msg[..8].copy_from_slice(&p.published().to_le_bytes());
                p.publish(&msg).expect("body fits");
            }
            for k in 0..readers {
                while ring.reader_next_seq(k) != Some(p.published()) {
                    std::hint::spin_loop();
                }
            }
            t.elapsed()
        });
        stop(&shm, &mut children);
        rates
    }

    fn sink(shm: &Shm, idx: usize, readers: usize, body: usize) {
        let ring = Mcast::ring(shm, readers);
        let mut c = ring.consumer(idx).expect("fresh cursor");
        let (mut buf, mut sum, mut n) = (Vec::with_capacity(body), 0u64, 0u64);
        loop {
            match c.next(&mut buf).expect("honest producer") {
                Some(_) => {
                    sum = sum.wrapping_add(u64::from_le_bytes(black_box(&buf)[..8].try_into().expect("8 bytes")));
                    n += 1;
                    if n % 64 == 0 {
                        c.release();
                    }
                }
                None => {
                    c.release();
                    if shm.word(OFF_STOP).load(Ordering::Acquire) != 0 {
                        let lost = c.take_lost();
                        if lost != 0 {
                            eprintln!("reader {idx} was lapped: {lost} messages lost (the producer paces)");
                        }
                        black_box(sum);
                        return;
                    }
                    idle(readers > 1);
                }
            }
        }
    }
}
