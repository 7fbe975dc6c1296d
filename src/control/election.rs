//! Broker election and failover: the lock file's named bytes, the rule that decides when a
//! worker may run, reconnection backoff with jitter, stepping down (fencing) and resigning.
//!
//! The lock file `<listening>.lock` holds one open-file-description lock per role (they
//! behave like `flock`: the kernel drops them when the holder dies, however it dies, and they
//! can be queried without disturbing the holder, `F_OFD_GETLK`):
//! * byte 0: the broker;
//! * byte `1 + slot`: worker slot `slot` (two live processes can never hold one id);
//! * byte [`REGION_LOCK_BASE`]` + slot`: held by a worker while it holds the shared region
//!   (attached, or broker). A worker that has no region yet never runs for election while
//!   another live process holds one: a region holder takes over (it runs at once, and a
//!   stuck broker is replaced through the heartbeat), and a fresh region would strand every
//!   event queued in the live one (a restarted worker must get the events queued for its
//!   slot). If every holder is stuck, a newcomer waits for one of them to run or die: the
//!   deployment is never split over two regions (issue 11, item 7).
//!
//! Byte 0 alone cannot tell a stuck broker (stopped, or its worker blocked in a callback)
//! from a live one: on shared memory the serving broker also stores a heartbeat in the region
//! every [`BEAT_INTERVAL`], and a region holder that finds it older than [`STUCK_AFTER`]
//! takes the role over by a compare-and-swap on it and the next epoch, serving without byte 0
//! until the stuck holder lets go (`worker/broker.rs`, `Region::take_over_stale_broker`).
//! Epoch plus heartbeat are the authority; byte 0 is taken by whoever serves as soon as it
//! is free. A lock file removed or replaced at the path: `lockfile.rs`.
//!
//! The preferred broker (`broker_id`) takes byte 0 at once; any other worker only after it
//! has failed to reach a broker for [`ELECTION_GRACE`], so the preferred one normally wins at
//! start-up while a missing or dead broker is still replaced.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Control, Role};
use crate::sys::{self, Epoll};

/// How long a non-preferred worker waits for a broker before it runs for election itself.
pub(crate) const ELECTION_GRACE: Duration = Duration::from_millis(200);
/// First reconnection delay after a failed attempt; doubled per failure up to
/// [`BACKOFF_MAX`], with jitter (each delay is drawn from `[d/2, d]`).
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(1);
/// Longest reconnection delay.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_millis(50);
/// Lock-file byte of slot 0's "holds the region" lock (far above the worker-id bytes).
pub(crate) const REGION_LOCK_BASE: u64 = 1 << 24;
/// How long a worker that won the election but could not serve (the socket path cannot be
/// bound, no descriptors left, ...) stays out of elections: another worker may take over
/// meanwhile, and a persistent failure costs one attempt per period, not one per backoff.
pub(crate) const SERVE_RETRY: Duration = Duration::from_secs(1);
/// Lock-file byte of the broker role.
const BROKER_BYTE: u64 = 0;
/// A serving broker stores a heartbeat in the region at least this often (a timer wakes it
/// even when idle, also when an external poller drives it).
pub(crate) const BEAT_INTERVAL: Duration = Duration::from_millis(100);
/// A worker that is not the broker looks at the broker's heartbeat (and at the lock file)
/// this often.
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// A broker whose heartbeat is older than this is stuck (stopped, or its worker blocked in a
/// callback): a region holder takes the role over. With [`CHECK_INTERVAL`], a stuck broker
/// is replaced within 0.9 s of its last heartbeat (plus the scheduling delay of the
/// worker that takes over).
pub(crate) const STUCK_AFTER: Duration = Duration::from_millis(700);

/// Path of the lock file beside the socket.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// The lock file, with one method per named byte.
#[derive(Debug)]
pub(crate) struct LockFile(sys::ParentOnly);

impl LockFile {
    /// Open (creating, mode 0600) the lock file, never through a symbolic link; refuse one
    /// that is not a regular file, belongs to a uid that is neither ours nor allowed, or that
    /// any user may write. Also returns its identity and whether this call created it.
    pub(crate) fn open(path: &Path, allowed_uids: &[u32]) -> io::Result<(LockFile, sys::FileId, bool)> {
        let (fd, created) = sys::open_lock_file(path)?;
        let id = sys::fstat_id(fd.as_fd())?;
        let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
        if !id.is_regular() {
            return refuse(format!("{} is not a regular file", path.display()));
        }
        if id.uid != sys::euid() && !allowed_uids.contains(&id.uid) {
            return refuse(format!(
                "{} belongs to uid {}, not to this user (or an allowed uid)",
                path.display(),
                id.uid
            ));
        }
        if id.mode & 0o002 != 0 {
            return refuse(format!("{} is writable by every user (mode {:o})", path.display(), id.mode & 0o7777));
        }
        Ok((LockFile(sys::ParentOnly::new(fd)), id, created))
    }

    /// Take the lock of worker slot `slot`; false when another live process holds it.
    pub(crate) fn try_slot(&self, slot: u32) -> io::Result<bool> {
        sys::try_lock_byte(self.0.as_fd(), 1 + u64::from(slot))
    }

    /// Does another live process hold worker slot `slot`?
    pub(crate) fn slot_held_by_other(&self, slot: u32) -> bool {
        sys::byte_locked_by_other(self.0.as_fd(), 1 + u64::from(slot))
    }

    /// Take every lock of the file at once; false when any live process holds one.
    pub(crate) fn try_all(&self) -> io::Result<bool> {
        sys::try_lock_all(self.0.as_fd())
    }

    /// Take the broker lock; false when another live process holds it (or on error).
    pub(crate) fn try_broker(&self) -> bool {
        sys::try_lock_byte(self.0.as_fd(), BROKER_BYTE).unwrap_or(false)
    }

    /// Release the broker lock (no error if not held).
    pub(crate) fn release_broker(&self) {
        let _ = sys::unlock_byte(self.0.as_fd(), BROKER_BYTE);
    }

    /// Take slot `slot`'s "holds the region" lock.
    pub(crate) fn try_region(&self, slot: u32) -> io::Result<bool> {
        sys::try_lock_byte(self.0.as_fd(), REGION_LOCK_BASE + u64::from(slot))
    }

    /// Does another live process hold the region lock of any of `slots` slots?
    pub(crate) fn region_held_by_other(&self, slots: u32) -> bool {
        sys::range_locked_by_other(self.0.as_fd(), REGION_LOCK_BASE, u64::from(slots))
    }
}

/// Election state of one [`Control`].
#[derive(Debug)]
pub(crate) struct Election {
    /// Next (un-jittered) reconnection delay.
    backoff: Duration,
    /// xorshift64 state for the jitter.
    rng: u64,
    /// This process holds its region lock byte (it has the shared region).
    pub(super) holds_region: bool,
    /// Closing: never run for election again.
    leaving: bool,
    /// After stepping down (fenced) or failing to serve: do not run for election before
    /// this instant.
    no_run_until: Option<Instant>,
    /// Serving failed since the last success (the error was surfaced once already).
    serve_failed: bool,
    /// This process holds the broker lock byte (a worker that took the role over from a
    /// stuck broker serves without it until the stuck one lets go).
    pub(super) holds_broker_byte: bool,
}

impl Default for Election {
    fn default() -> Self {
        Election {
            backoff: BACKOFF_MIN,
            rng: sys::random_u64() | 1,
            holds_region: false,
            leaving: false,
            no_run_until: None,
            serve_failed: false,
            holds_broker_byte: false,
        }
    }
}

impl Election {
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
        let e = &self.election;
        if e.leaving || e.no_run_until.is_some_and(|t| now < t) {
            return false;
        }
        if self.lock_replaced() {
            // Our lock file is not the one at the path (removed or replaced): its byte 0 no
            // longer excludes a broker of the processes that opened the new file. Wait for
            // the lock-file check to move us onto the file at the path.
            return false;
        }
        if e.holds_region || self.was_attached {
            // We hold the live region (and its queues): take over at once.
            return true;
        }
        let age = now.duration_since(self.started);
        if self.lock.region_held_by_other(self.geo.slots) {
            return false;
        }
        self.preferred || age >= ELECTION_GRACE
    }

    /// Record that this process now holds the shared region (lock byte
    /// `REGION_LOCK_BASE + slot`; the kernel drops it when the process dies).
    pub(crate) fn hold_region(&mut self) {
        if !self.election.holds_region {
            match self.lock.try_region(self.slot) {
                Ok(true) => self.election.holds_region = true,
                Ok(false) => tracing::warn!(slot = self.slot, "region lock byte held by another process"),
                Err(e) => tracing::warn!(error = %e, "cannot take the region lock byte"),
            }
        }
    }

    /// Took the broker lock byte (the election).
    pub(super) fn took_broker_byte(&mut self) {
        self.election.holds_broker_byte = true;
    }

    /// (broker) Take the broker lock byte if we serve without it (we took the role over from
    /// a stuck broker, which holds it until it runs again and steps down, or dies): the lock
    /// and the epoch agree again.
    pub(crate) fn adopt_broker_lock(&mut self) {
        if self.is_broker() && !self.election.holds_broker_byte && self.lock.try_broker() {
            tracing::info!(
                slot = self.slot,
                pid = std::process::id(),
                "took the broker lock byte over from the stuck broker"
            );
            self.election.holds_broker_byte = true;
        }
    }

    /// May this worker take the broker role over from a stuck broker now (not closing, not
    /// just stepped down, not the broker)?
    pub(crate) fn may_take_over(&self, now: Instant) -> bool {
        let e = &self.election;
        !self.is_broker() && !e.leaving && e.no_run_until.is_none_or(|t| now >= t)
    }

    /// We won the election but could not become the broker: release the broker lock (so
    /// that another worker can take over), drop whatever was set up, and stay out of
    /// elections for [`SERVE_RETRY`]. True the first time since the last success: the
    /// caller surfaces the error once, later failures are only logged.
    pub(crate) fn serve_failed(&mut self, epoll: &Epoll) -> bool {
        self.release_broker_byte();
        self.drop_role(epoll);
        let now = Instant::now();
        self.election.no_run_until = Some(now + SERVE_RETRY);
        self.next_retry = now + self.election.next_backoff();
        !std::mem::replace(&mut self.election.serve_failed, true)
    }

    fn release_broker_byte(&mut self) {
        self.lock.release_broker();
        for old in &self.retired {
            old.release_broker();
        }
        self.election.holds_broker_byte = false;
    }

    /// Serving started: a later failure is surfaced again.
    pub(super) fn served(&mut self) {
        self.election.serve_failed = false;
    }

    /// Detached and due for another connection attempt, or waiting for an answer to our
    /// HELLO for too long (see [`super::HELLO_TIMEOUT`]).
    pub(crate) fn retry_due(&self) -> bool {
        match &self.role {
            Role::Detached => Instant::now() >= self.next_retry,
            Role::Client { conn, welcomed: None, .. } => Instant::now() >= conn.opened + super::HELLO_TIMEOUT,
            _ => false,
        }
    }

    /// (broker) A newer broker exists (fencing): stop serving, release the broker lock,
    /// and stay out of elections for [`ELECTION_GRACE`]; reconnect as a client meanwhile.
    pub(crate) fn step_down(&mut self, epoll: &Epoll) {
        if !self.is_broker() {
            return;
        }
        // Our listener is closed, never unlinked: the path is the new broker's.
        self.release_broker_byte();
        self.drop_role(epoll);
        let now = Instant::now();
        self.election.no_run_until = Some(now + ELECTION_GRACE);
        self.next_retry = now;
    }

    /// Graceful close: never run for election again; if broker, release the broker lock
    /// first, then close the listener and every connection, so the clients (which see
    /// EOF) elect a successor at once.
    pub(crate) fn resign(&mut self, epoll: &Epoll) {
        self.election.leaving = true;
        if self.is_broker() {
            self.release_broker_byte();
            self.drop_role(epoll);
            tracing::info!(slot = self.slot, pid = std::process::id(), "resigned the broker role");
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut fo = Election::default();
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
        // A socket that still accepts connections is never replaced by an election winner...
        let e = sys::listen_unix(&path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        assert!(sys::connect_unix(&path).is_ok(), "the live socket is still there");
        // ... only by the takeover from a stuck broker, atomically (renamed over it).
        let l2 = sys::listen_unix_over(&path).unwrap();
        while sys::accept(l.as_fd()).unwrap().is_some() {} // the probes above
        let _c = sys::connect_unix(&path).unwrap();
        assert!(sys::accept(l2.as_fd()).unwrap().is_some(), "the path leads to the new listener");
        assert!(sys::accept(l.as_fd()).unwrap().is_none(), "not to the old one");
        drop((l, l2));
        // Anything else at the path is left alone.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not a socket").unwrap();
        let e = sys::listen_unix(&path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        let _ = std::fs::remove_dir_all(dir);
    }
}
