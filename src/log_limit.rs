//! Rate-limited log lines for the per-event path.
//!
//! A condition that can repeat for every event (a malformed message from a hostile peer, a
//! callback that panics on every call, a full unique table) is logged at most once per
//! [`INTERVAL`] per call site, with a `suppressed` field counting the lines left out since
//! the previous one; the counters in `Stats` keep the exact totals. So a storm of bad events
//! costs one log line per second, not one per event.

use crate::sync::Ordering::Relaxed;
use crate::sync::process_local::AtomicU64;
use crate::sys;

/// At most one line per call site and interval.
pub(crate) const INTERVAL_NS: u64 = 1_000_000_000;

/// The state of one call site (a `static`, process-wide).
pub(crate) struct LogLimit {
    /// CLOCK_MONOTONIC nanoseconds before which the site stays quiet.
    next_ns: AtomicU64,
    /// Lines left out since the last one logged.
    suppressed: AtomicU64,
}

impl LogLimit {
    /// A call site that has logged nothing yet.
    pub(crate) const fn new() -> Self {
        LogLimit { next_ns: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(lines suppressed since the last one)` when this call may log, else `None` (and
    /// the line is counted as suppressed).
    pub(crate) fn admit(&self) -> Option<u64> {
        self.admit_at(sys::monotonic_ns())
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let next = self.next_ns.load(Relaxed);
        if now >= next && self.next_ns.compare_exchange(next, now + INTERVAL_NS, Relaxed, Relaxed).is_ok() {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

/// `tracing::event!(level, suppressed, fields..., message)`, at most once per
/// [`INTERVAL_NS`] at this call site.
macro_rules! log_limited {
    ($level:expr, $($rest:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit = $crate::log_limit::LogLimit::new();
        if let Some(suppressed) = LIMIT.admit() {
            tracing::event!($level, suppressed, $($rest)+);
        }
    }};
}
pub(crate) use log_limited;

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_the_rest() {
        let l = LogLimit::new();
        let t0 = 5 * INTERVAL_NS;
        assert_eq!(l.admit_at(t0), Some(0));
        for i in 1..1000 {
            assert_eq!(l.admit_at(t0 + i), None);
        }
        assert_eq!(l.admit_at(t0 + INTERVAL_NS), Some(999));
        assert_eq!(l.admit_at(t0 + INTERVAL_NS + 1), None);
    }
}
