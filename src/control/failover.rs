//! Failover pieces of the control channel: reconnection backoff with jitter, the election
//! rule that keeps the live region, fencing (a broker that finds a newer epoch steps down),
//! and resigning the broker role on a graceful close.
//!
//! Lock file bytes used here, beside byte 0 (broker) and `1 + slot` (worker ids):
//! byte [`REGION_LOCK_BASE`]` + slot` is held by a worker while it holds the shared region
//! (attached, or broker). A worker that has no region yet does not run for election while
//! another live process holds one, for up to [`ORPHAN_GRACE`]: a region holder is about to
//! take over (it runs at once), and a fresh region would strand every event queued in the
//! live one (a restarted worker must get the events queued for its slot).

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::{Control, ELECTION_GRACE, Role};
use crate::sys::{self, Epoll};

/// First reconnection delay after a failed attempt; doubled per failure up to
/// [`BACKOFF_MAX`], with jitter (each delay is drawn from `[d/2, d]`).
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(1);
/// Longest reconnection delay.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_millis(50);
/// How long a worker without a region defers to live region holders before it creates a
/// fresh region anyway (the holders are wedged or not dispatching).
pub(crate) const ORPHAN_GRACE: Duration = Duration::from_secs(1);
/// Lock-file byte of slot 0's "holds the region" lock (far above the worker-id bytes).
pub(crate) const REGION_LOCK_BASE: u64 = 1 << 24;
/// Reason prefix of a transient refusal: the slot still looks attached because the broker
/// has not yet seen its previous holder's connection close. The client retries (backoff)
/// instead of reporting an error.
pub(crate) const BUSY_PREFIX: &str = "busy: ";

/// Failover state of one [`Control`].
#[derive(Debug)]
pub(crate) struct FailoverState {
    /// Next (un-jittered) reconnection delay.
    backoff: Duration,
    /// xorshift64 state for the jitter.
    rng: u64,
    /// This process holds its region lock byte (it has the shared region).
    holds_region: bool,
    /// Closing: never run for election again.
    leaving: bool,
    /// After stepping down (fenced): do not run for election before this instant.
    no_run_until: Option<Instant>,
}

impl Default for FailoverState {
    fn default() -> Self {
        FailoverState {
            backoff: BACKOFF_MIN,
            rng: sys::random_u64() | 1,
            holds_region: false,
            leaving: false,
            no_run_until: None,
        }
    }
}

impl FailoverState {
    /// Forget the failures: the next disconnection retries at once, then from
    /// [`BACKOFF_MIN`].
    pub(crate) fn reset_backoff(&mut self) {
        self.backoff = BACKOFF_MIN;
    }

    /// The delay before the next connection attempt (exponential backoff with jitter);
    /// doubles the base for the one after.
    pub(crate) fn next_backoff(&mut self) -> Duration {
        let d = self.backoff;
        self.backoff = (d * 2).min(BACKOFF_MAX);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = d.as_nanos() as u64 / 2;
        Duration::from_nanos(half + self.rng % (half + 1))
    }
}

impl Control {
    /// May this worker take the broker lock now? Called after a connection attempt failed.
    pub(crate) fn may_run(&self, now: Instant) -> bool {
        if self.fo.leaving || self.fo.no_run_until.is_some_and(|t| now < t) {
            return false;
        }
        if self.fo.holds_region || self.was_attached {
            // We hold the live region (and its queues): take over at once.
            return true;
        }
        let age = now.duration_since(self.started);
        if self.others_hold_region() {
            return age >= ORPHAN_GRACE;
        }
        self.preferred || age >= ELECTION_GRACE
    }

    /// Does another live process hold the shared region?
    fn others_hold_region(&self) -> bool {
        sys::range_locked_by_other(self.lock.as_fd(), REGION_LOCK_BASE, u64::from(self.geo.slots))
    }

    /// Record that this process now holds the shared region (lock byte
    /// `REGION_LOCK_BASE + slot`; the kernel drops it when the process dies).
    pub(crate) fn hold_region(&mut self) {
        if !self.fo.holds_region {
            match sys::try_lock_byte(self.lock.as_fd(), REGION_LOCK_BASE + u64::from(self.slot)) {
                Ok(true) => self.fo.holds_region = true,
                Ok(false) => tracing::warn!(slot = self.slot, "region lock byte held by another process"),
                Err(e) => tracing::warn!(error = %e, "cannot take the region lock byte"),
            }
        }
    }

    /// Detached and due for another connection attempt.
    pub(crate) fn retry_due(&self) -> bool {
        matches!(self.role, Role::Detached) && Instant::now() >= self.next_retry
    }

    /// (broker) A newer broker exists (fencing): stop serving, release the broker lock,
    /// and stay out of elections for [`ELECTION_GRACE`]; reconnect as a client meanwhile.
    pub(crate) fn step_down(&mut self, epoll: &Epoll) {
        if !self.is_broker() {
            return;
        }
        let _ = sys::unlock_byte(self.lock.as_fd(), 0);
        self.drop_role(epoll);
        let now = Instant::now();
        self.fo.no_run_until = Some(now + ELECTION_GRACE);
        self.next_retry = now;
    }

    /// Graceful close: never run for election again; if broker, release the broker lock
    /// first, then close the listener and every connection, so the clients (which see
    /// EOF) elect a successor at once.
    pub(crate) fn resign(&mut self, epoll: &Epoll) {
        self.fo.leaving = true;
        if self.is_broker() {
            let _ = sys::unlock_byte(self.lock.as_fd(), 0);
            self.drop_role(epoll);
            tracing::info!(slot = self.slot, "resigned the broker role");
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut fo = FailoverState::default();
        let mut base = BACKOFF_MIN;
        for _ in 0..12 {
            let d = fo.next_backoff();
            assert!(d >= base / 2 && d <= base, "{d:?} outside [{:?}, {base:?}]", base / 2);
            base = (base * 2).min(BACKOFF_MAX);
        }
        fo.reset_backoff();
        assert!(fo.next_backoff() <= BACKOFF_MIN);
    }

    #[test]
    fn a_stale_socket_is_replaced_but_nothing_else() {
        let dir = std::env::temp_dir().join(format!("we-fo-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ev.sock");
        // A socket file whose listener is gone (a dead broker's) is replaced.
        drop(sys::listen_unix(&path).unwrap());
        assert!(sys::connect_unix(&path).is_err(), "nobody listens on the stale socket");
        let l = sys::listen_unix(&path).unwrap();
        assert!(sys::connect_unix(&path).is_ok());
        drop(l);
        // Anything else at the path is left alone.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not a socket").unwrap();
        let e = sys::listen_unix(&path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        let _ = std::fs::remove_dir_all(dir);
    }
}
