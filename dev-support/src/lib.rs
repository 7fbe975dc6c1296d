//! What the tests, benches and examples of `worker-events` share, so that each helper exists
//! once: a clock that every process of the host reads alike ([`monotonic_ns`]), percentiles
//! of a sample ([`percentile`], [`Sample`]), a seeded generator ([`Rng`]), a temporary
//! directory that removes itself ([`TempDir`]), and the plumbing of multi-process harnesses:
//! re-executing the current binary in a child role, passing it descriptors, tying its life
//! to the parent's, reaping it, pinning to CPUs ([`process`]), and the load average.
//!
//! Linux only, like the crate it serves. Not published; a dev-dependency of the workspace
//! root (`dev-support/` in the repository).

pub mod process;
mod rng;
mod stats;
mod tempdir;

pub use rng::Rng;
pub use stats::{Ordered, Sample, percentile, sort};
pub use tempdir::TempDir;

/// `CLOCK_MONOTONIC` now, in nanoseconds.
///
/// This is the clock the library uses for its own deadlines and the one every process of the
/// host reads alike, so an instant taken in one process and carried in an event (or a report
/// line) can be subtracted from one taken in another process: the difference is a
/// cross-process latency.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer to a timespec we own; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The 1, 5 and 15 minute load averages of the host as printed in `/proc/loadavg`
/// (e.g. `"0.52 0.61 0.70"`), or `"?"` if that file cannot be read.
///
/// Benches print it before and after measuring: figures taken on a loaded host are suspect.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_ns_does_not_go_back_and_tracks_instant() {
        let a = monotonic_ns();
        let t = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = monotonic_ns();
        assert!(b >= a + 5_000_000, "{a} -> {b}");
        // Instant is CLOCK_MONOTONIC too: both saw the same interval, give or take scheduling.
        let elapsed = t.elapsed().as_nanos() as u64;
        assert!((b - a).abs_diff(elapsed) < 50_000_000, "clock {} ns, Instant {elapsed} ns", b - a);
    }

    #[test]
    fn loadavg_has_three_figures() {
        let l = loadavg();
        assert_eq!(l.split_whitespace().count(), 3, "{l:?}");
        assert!(l.split_whitespace().all(|f| f.parse::<f64>().is_ok()), "{l:?}");
    }
}
