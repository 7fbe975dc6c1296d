//! The self-timed summaries: a baseline and its variants measured in alternating rounds, and
//! each variant's ratio to the baseline taken per round.
//!
//! On a shared VM the cost of a cache-line transfer between two vCPUs changes over time (the
//! host moves them), so a figure is only comparable to a baseline measured next to it. Each
//! round measures every side once (many short chunks, so a preemption spoils a chunk, not the
//! median); a side's ratio is the median over the rounds of (its round median / the
//! baseline's round median).

use std::time::Duration;

use worker_events_dev_support::Sample;

/// Median and best decile of repeated self-timed measurements.
#[derive(Default, Clone, Copy)]
pub struct Sampled {
    /// The median.
    pub median: f64,
    /// 10th percentile for times, 90th for rates.
    pub best: f64,
}

impl Sampled {
    /// Median and best decile of `v` (`higher_is_better` for rates); zeros if `v` is empty.
    pub fn of(v: Vec<f64>, higher_is_better: bool) -> Sampled {
        let s = Sample::new(v);
        let best = s.percentile(if higher_is_better { 0.9 } else { 0.1 });
        Sampled { median: s.median().unwrap_or(0.0), best: best.unwrap_or(0.0) }
    }
}

/// One side of an alternating measurement, against side 0 (the baseline).
#[derive(Default, Clone, Copy)]
pub struct Compared {
    /// Every chunk of every round.
    pub all: Sampled,
    /// Median over the rounds of (this side's median / the baseline's median).
    pub ratio: f64,
    /// Median over the rounds of (this side's median - the baseline's median).
    pub diff: f64,
}

/// Run `rounds` rounds of `sides` sides; `round(i)` measures side `i` once and returns its
/// chunk figures. Side 0 is the baseline (its ratio is 1).
pub fn alternate(
    rounds: usize,
    sides: usize,
    higher_is_better: bool,
    mut round: impl FnMut(usize) -> Vec<f64>,
) -> Vec<Compared> {
    let mut all = vec![Vec::new(); sides];
    let mut ratios = vec![Vec::new(); sides];
    let mut diffs = vec![Vec::new(); sides];
    for _ in 0..rounds {
        let figures: Vec<Vec<f64>> = (0..sides).map(&mut round).collect();
        let medians: Vec<f64> = figures.iter().map(|f| Sampled::of(f.clone(), higher_is_better).median).collect();
        for (i, f) in figures.into_iter().enumerate() {
            ratios[i].push(medians[i] / medians[0]);
            diffs[i].push(medians[i] - medians[0]);
            all[i].extend(f);
        }
    }
    (0..sides)
        .map(|i| Compared {
            all: Sampled::of(std::mem::take(&mut all[i]), higher_is_better),
            ratio: Sampled::of(std::mem::take(&mut ratios[i]), false).median,
            diff: Sampled::of(std::mem::take(&mut diffs[i]), false).median,
        })
        .collect()
}

/// Nanoseconds per operation.
pub fn per_op_ns(d: Duration, ops: u64) -> f64 {
    d.as_nanos() as f64 / ops as f64
}
