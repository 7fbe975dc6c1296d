//! Benches as a table of (baseline, library) pairs: a scenario is written once (a type
//! implementing [`Scenario`] and one [`Pair`] row), and the table runner does the rest: the
//! criterion phase ([`criterion_phase`]), the self-timed alternating rounds ([`self_timed`])
//! and the summary rows with the ratio to the baseline and the target ([`print_summary`]),
//! and for the ping-pong pairs that ask for it ([`PerHop`]) every round trip's time in HDR
//! histograms ([`super::hops`], printed by [`print_hops`]).

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};

use super::hops::{Hops, new_histogram, one_way, record_stamps};
use super::summary::{Compared, alternate, per_op_ns};
use super::wanted;

/// A measured setup, usually this process and a peer process (spawned by the constructor,
/// reaped on drop).
pub trait Scenario {
    /// Time `n` operations: round trips of a ping-pong, messages of a stream.
    fn run(&mut self, n: u64) -> Duration;

    /// Cumulative counters worth printing under the summary (a worker's `stats()`); the
    /// summary shows how much each grew during the measured chunks.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// Like `run`, and push `Instant::now()` into `stamps` before the first operation and
    /// after every one (a ping-pong's round trip), so consecutive stamps bound each
    /// operation and add up to the total. Only the scenarios of pairs with per-hop
    /// histograms ([`PerHop`]) implement it.
    fn run_each(&mut self, n: u64, stamps: &mut Vec<Instant>) -> Duration {
        let _ = (n, stamps);
        unimplemented!("this scenario does not time single operations")
    }
}

/// Start a scenario; the argument is the CPU for its peer process.
pub type Spawn = fn(Option<usize>) -> Box<dyn Scenario>;

/// One side of a pair.
pub struct Side {
    /// Criterion id, `group/name`; also matched by the command-line filter.
    pub id: &'static str,
    /// Row label in the summary.
    pub label: &'static str,
    pub spawn: Spawn,
    /// Operations per self-timed chunk.
    pub chunk: u64,
}

/// The unit a time is printed in.
#[derive(Clone, Copy)]
pub enum TimeUnit {
    Ns,
    Us,
}

/// What a pair's figure is.
#[derive(Clone, Copy)]
pub enum Metric {
    /// A ping-pong: `run(n)` times n round trips; the figure is the one-way time (half).
    OneWay(TimeUnit),
    /// A stream: `run(n)` times n messages; the figure is messages per second.
    Rate,
}

impl Metric {
    fn higher_is_better(self) -> bool {
        matches!(self, Metric::Rate)
    }

    /// The self-timed figure of `ops` operations that took `d`: ns one-way, or events/s.
    fn figure(self, d: Duration, ops: u64) -> f64 {
        match self {
            Metric::OneWay(_) => per_op_ns(d, ops) / 2.0,
            Metric::Rate => 1e9 / per_op_ns(d, ops),
        }
    }

    /// Divisor and unit of the printed figure.
    fn scale(self) -> (f64, &'static str) {
        match self {
            Metric::OneWay(TimeUnit::Ns) => (1.0, "ns"),
            Metric::OneWay(TimeUnit::Us) => (1e3, "us"),
            Metric::Rate => (1e6, "M/s"),
        }
    }
}

/// A performance target of `ARCHITECTURE.md` §P, checked against a pair's summary.
#[derive(Clone, Copy)]
pub enum PerfTarget {
    /// The library's ratio to the baseline at most this.
    RatioAtMost(f64),
    /// The library at most this many ns slower than the baseline.
    PlusAtMostNs(f64),
    /// The library's median rate at least this many events/s.
    RateAtLeast(f64),
}

impl PerfTarget {
    fn text(self, vs: &str) -> String {
        match self {
            PerfTarget::RatioAtMost(r) => format!("<= {r}x {vs}"),
            PerfTarget::PlusAtMostNs(ns) => format!("<= {vs} + {} us", ns / 1e3),
            PerfTarget::RateAtLeast(r) => format!(">= {} M/s", r / 1e6),
        }
    }

    fn met(self, lib: &Compared) -> bool {
        match self {
            PerfTarget::RatioAtMost(r) => lib.ratio <= r,
            PerfTarget::PlusAtMostNs(ns) => lib.diff <= ns,
            PerfTarget::RateAtLeast(r) => lib.all.median >= r,
        }
    }
}

/// Whether the self-timed summary also records a ping-pong pair's every round trip
/// ([`Scenario::run_each`]) in HDR histograms, and the `ARCHITECTURE.md` §P bound on the
/// library's one-way p99 over the baseline's.
#[derive(Clone, Copy)]
pub enum PerHop {
    /// Means only (streams, and pairs nobody asked a tail of).
    Off,
    /// p50/p99/p99.9 of both sides, no target on the tail.
    On,
    /// p50/p99/p99.9 of both sides; the library's p99 at most this many times the
    /// baseline's.
    P99RatioAtMost(f64),
}

/// One table row: a baseline and the library measured against it.
pub struct Pair {
    pub metric: Metric,
    /// Criterion-only variants of the baseline, benched before it, not in the summary.
    pub extra: &'static [Side],
    pub base: Side,
    pub lib: Side,
    /// The baseline's short name in the ratio column.
    pub vs: &'static str,
    pub target: Option<PerfTarget>,
    /// Per-hop histograms (ping-pong pairs only).
    pub per_hop: PerHop,
}

impl Pair {
    fn wanted(&self) -> bool {
        wanted(self.base.id) || wanted(self.lib.id)
    }
}

/// Criterion: each side the filter selects, with one peer process per side. A ping-pong's
/// figure is the one-way time (round trip / 2), a stream's has a throughput of one element
/// per operation.
pub fn criterion_phase(c: &mut Criterion, table: &[Pair], cpu: Option<usize>) {
    for pair in table {
        for side in pair.extra.iter().chain([&pair.base, &pair.lib]) {
            if !wanted(side.id) {
                continue;
            }
            let mut s = (side.spawn)(cpu);
            match pair.metric {
                Metric::OneWay(_) => {
                    c.bench_function(side.id, |b| b.iter_custom(|n| s.run(n) / 2));
                }
                Metric::Rate => {
                    let (group, name) = side.id.split_once('/').expect("criterion ids are group/name");
                    let mut g = c.benchmark_group(group);
                    g.throughput(Throughput::Elements(1));
                    g.bench_function(name, |b| b.iter_custom(|n| s.run(n)));
                    g.finish();
                }
            }
        }
    }
}

/// A pair's self-timed result.
pub struct Measured {
    pub base: Compared,
    pub lib: Compared,
    /// Operations the library side ran in the measured chunks.
    pub lib_ops: u64,
    /// How much the library's counters grew during them.
    pub counters: Vec<(&'static str, u64)>,
    /// The per-hop histograms, if the pair records them.
    pub hops: Option<Hops>,
}

/// Round trips per side and round timed one by one for the histograms: at least this many
/// (the parked pair's chunks are small), else the side's `CHUNKS x chunk`.
const MIN_HOPS_PER_ROUND: u64 = 5_000;

/// `rounds` alternating rounds of baseline and library, each with a fresh scenario (fresh
/// peer processes) running `chunks` chunks; `None` if the filter selects neither side.
///
/// With [`PerHop`] on, each side then runs, in the same round and with the same peer
/// processes, more chunks timed round trip by round trip for the histograms (after the
/// timed chunks, so the medians do not include the per-operation clock reads).
pub fn self_timed(pair: &Pair, cpu: Option<usize>, rounds: usize, chunks: usize) -> Option<Measured> {
    if !pair.wanted() {
        return None;
    }
    let mut counters: Vec<(&'static str, u64)> = Vec::new();
    let mut lib_ops = 0;
    let mut hops = match pair.per_hop {
        PerHop::Off => None,
        PerHop::On | PerHop::P99RatioAtMost(_) => Some(Hops::new()),
    };
    let mut stamps = Vec::new();
    let cmp = alternate(rounds, 2, pair.metric.higher_is_better(), |i| {
        let side = if i == 0 { &pair.base } else { &pair.lib };
        let mut s = (side.spawn)(cpu);
        let before = s.counters();
        let v = (0..chunks).map(|_| pair.metric.figure(s.run(side.chunk), side.chunk)).collect();
        if i == 1 {
            lib_ops += chunks as u64 * side.chunk;
            for ((name, after), (_, before)) in s.counters().into_iter().zip(before) {
                match counters.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, total)) => *total += after - before,
                    None => counters.push((name, after - before)),
                }
            }
        }
        // The per-hop chunks: after the counters, which cover the timed chunks only.
        if let Some(h) = hops.as_mut() {
            let mut round = new_histogram();
            let mut left = (chunks as u64 * side.chunk).max(MIN_HOPS_PER_ROUND);
            while left > 0 {
                let n = left.min(side.chunk);
                left -= n;
                stamps.clear();
                stamps.reserve(n as usize + 1);
                s.run_each(n, &mut stamps);
                record_stamps(&mut round, &stamps);
            }
            h.add_round(i == 1, round);
        }
        v
    });
    Some(Measured { base: cmp[0], lib: cmp[1], lib_ops, counters, hops })
}

/// The summary rows of the table: median, best decile, the library's ratio to its baseline
/// and the `ARCHITECTURE.md` §P target next to it; then the counters.
pub fn print_summary(table: &[Pair], results: &[Option<Measured>]) {
    println!(
        "{:<42} {:>15} {:>15} {:<30} target (ARCHITECTURE.md §P)",
        "measurement", "median", "best decile", "ratio"
    );
    for (pair, r) in table.iter().zip(results) {
        let (scale, unit) = pair.metric.scale();
        let Some(m) = r else {
            for side in [&pair.base, &pair.lib] {
                println!("{:<42} {:>15}", side.label, "not run");
            }
            continue;
        };
        let row = |label: &str, c: &Compared, ratio: &str, target: &str| {
            let line = format!(
                "{label:<42} {:>10.2} {unit:<4} {:>10.2} {unit:<4} {ratio:<30} {target}",
                c.all.median / scale,
                c.all.best / scale
            );
            println!("{}", line.trim_end());
        };
        row(pair.base.label, &m.base, "baseline", "");
        let ratio = match pair.metric {
            Metric::OneWay(TimeUnit::Ns) => format!("{:.2}x {} ({:+.0} ns)", m.lib.ratio, pair.vs, m.lib.diff),
            Metric::OneWay(TimeUnit::Us) => format!("{:.2}x {} ({:+.2} us)", m.lib.ratio, pair.vs, m.lib.diff / 1e3),
            Metric::Rate => format!("{:.2}x {}", m.lib.ratio, pair.vs),
        };
        let target = match pair.target {
            Some(t) => format!("{}: {}", t.text(pair.vs), if t.met(&m.lib) { "met" } else { "NOT met" }),
            None => "-".into(),
        };
        row(pair.lib.label, &m.lib, &ratio, &target);
    }
    println!();
    for (pair, m) in table.iter().zip(results).filter_map(|(p, r)| Some((p, r.as_ref()?))) {
        if !m.counters.is_empty() {
            let c: Vec<String> = m.counters.iter().map(|(n, v)| format!("{n} {v}")).collect();
            println!("{} ({} operations measured): {}", pair.lib.label, m.lib_ops, c.join(", "));
        }
    }
}

/// The per-hop block of the summary: for every pair with [`PerHop`] on, each side's one-way
/// p50/p99/p99.9 over every round (round trip / 2 per sample, see [`super::hops`]); the
/// library's p50 and p99 ratios to the baseline, each the median over the rounds of the
/// round's ratio (as for the medians above), with the range of the per-round p99 ratios and
/// the ratio of the pooled p99s beside; and the p99 target (on the median ratio) when the pair
/// has one.
pub fn print_hops(table: &[Pair], results: &[Option<Measured>], clock_read_ns: f64) {
    let with: Vec<_> = table.iter().zip(results).filter_map(|(p, r)| Some((p, r.as_ref()?.hops.as_ref()?))).collect();
    if with.is_empty() {
        return;
    }
    println!();
    println!("per-hop one-way latency: HDR histogram of every round trip, halved (one clock read per round trip,");
    println!("~{clock_read_ns:.0} ns here, is inside each sample); quantiles over all rounds; ratio = median of the");
    println!("per-round ratios, [range of the per-round p99 ratios; ratio of the pooled p99s]");
    println!(
        "{:<42} {:>8} {:>13} {:>13} {:>13}  {:<54} target (ARCHITECTURE.md §P)",
        "measurement", "samples", "p50", "p99", "p99.9", "ratio"
    );
    for (pair, h) in with {
        let (scale, unit) = pair.metric.scale();
        let row = |label: &str, hist: &hdrhistogram::Histogram<u64>, ratio: &str, target: &str| {
            let q = |q: f64| format!("{:.2} {unit}", one_way(hist, q) / scale);
            let line = format!(
                "{label:<42} {:>8} {:>13} {:>13} {:>13}  {ratio:<54} {target}",
                hist.len(),
                q(0.5),
                q(0.99),
                q(0.999)
            );
            println!("{}", line.trim_end());
        };
        row(pair.base.label, &h.base, "baseline", "");
        let (lo, hi) = h.p99_ratio_range();
        let ratio = format!(
            "p50 {:.2}x, p99 {:.2}x {} [{lo:.2}-{hi:.2}; pooled {:.2}x]",
            h.p50_ratio(),
            h.p99_ratio(),
            pair.vs,
            h.pooled_p99_ratio()
        );
        let target = match pair.per_hop {
            PerHop::P99RatioAtMost(r) => {
                format!("p99 <= {r}x {}: {}", pair.vs, if h.p99_ratio() <= r { "met" } else { "NOT met" })
            }
            _ => "-".into(),
        };
        row(pair.lib.label, &h.lib, &ratio, &target);
    }
}
