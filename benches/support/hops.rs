//! Per-hop latency histograms for the ping-pong pairs of the self-timed summary.
//!
//! A ping-pong scenario's [`Scenario::run_each`](super::scenario::Scenario::run_each) reads
//! the clock once after every round trip (the reads are back to back, so the round trips add
//! up to the chunk's total). Every round trip goes into an HDR histogram
//! ([`hdrhistogram::Histogram`], 3 significant digits) in nanoseconds, and the one-way figures
//! printed are its quantiles halved: **round trip / 2 per sample**, both clock reads in the
//! bench process, so no clock is compared across processes or CPUs. A hiccup in one of the
//! two hops of a round trip shows as half its length; both sides of a pair are measured the
//! same way, so their ratio is fair.

use std::time::Instant;

use hdrhistogram::Histogram;

/// Largest round trip recorded exactly (60 s); longer ones are recorded as 60 s.
const MAX_NS: u64 = 60_000_000_000;

/// A histogram of round trips in ns, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

/// Record the round trips between consecutive `stamps` (the start, then one instant after
/// each round trip).
pub fn record_stamps(h: &mut Histogram<u64>, stamps: &[Instant]) {
    for w in stamps.windows(2) {
        h.saturating_record((w[1] - w[0]).as_nanos().min(u128::from(MAX_NS)) as u64);
    }
}

/// One-way quantile `q` of a histogram of round trips, in ns (half the round trip).
pub fn one_way(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 2.0
}

/// A pair's per-hop figures: the baseline's and the library's histograms (every round
/// pooled), and the ratios library / baseline of the one-way p50 and p99 in each round.
pub struct Hops {
    pub base: Histogram<u64>,
    pub lib: Histogram<u64>,
    /// (p50 ratio, p99 ratio) of each round.
    pub per_round: Vec<(f64, f64)>,
    /// The baseline's histogram of the round in progress.
    round_base: Histogram<u64>,
}

impl Hops {
    pub fn new() -> Hops {
        Hops { base: new_histogram(), lib: new_histogram(), per_round: Vec::new(), round_base: new_histogram() }
    }

    /// Add one round's histogram of the baseline (`lib` false) or, after it, the library.
    pub fn add_round(&mut self, lib: bool, round: Histogram<u64>) {
        if lib {
            let ratio = |q| one_way(&round, q) / one_way(&self.round_base, q);
            self.per_round.push((ratio(0.5), ratio(0.99)));
            self.lib.add(&round).expect("same bounds");
        } else {
            self.base.add(&round).expect("same bounds");
            self.round_base = round;
        }
    }

    /// The median over the rounds of the library's p50 / the baseline's p50 of the round.
    pub fn p50_ratio(&self) -> f64 {
        median(self.per_round.iter().map(|r| r.0).collect())
    }

    /// The median over the rounds of the library's p99 / the baseline's p99 of the round.
    pub fn p99_ratio(&self) -> f64 {
        median(self.per_round.iter().map(|r| r.1).collect())
    }

    /// The smallest and largest per-round p99 ratio.
    pub fn p99_ratio_range(&self) -> (f64, f64) {
        self.per_round.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), r| (lo.min(r.1), hi.max(r.1)))
    }

    /// The library's pooled p99 / the baseline's pooled p99 (every round together).
    pub fn pooled_p99_ratio(&self) -> f64 {
        one_way(&self.lib, 0.99) / one_way(&self.base, 0.99)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// What one `Instant::now()` costs here, in ns (the median of 31 runs of 10,000 reads). Each
/// per-hop sample includes one such read (half of it in the one-way figure).
pub fn clock_read_ns() -> f64 {
    let mut runs: Vec<f64> = (0..31)
        .map(|_| {
            let t = Instant::now();
            let mut last = t;
            for _ in 0..10_000 {
                last = std::hint::black_box(Instant::now());
            }
            (last - t).as_nanos() as f64 / 10_000.0
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}
