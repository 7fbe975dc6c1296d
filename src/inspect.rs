//! The live inspector: [`inspect`] a running deployment from outside, without taking a
//! worker slot, for operators (`cargo run --example top -- <listening>`).
//!
//! How and why it is safe against production: the docs of [`inspect`].

use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::control;
use crate::error::{Error, Result};
use crate::event::Wid;
use crate::layout::Geometry;
use crate::options::Transport;
use crate::region::Region;
use crate::sys;

/// Deadline of the exchange with the broker in [`inspect`] (connect, request, reply).
///
/// # Examples
///
/// ```
/// assert_eq!(worker_events::INSPECT_TIMEOUT, std::time::Duration::from_secs(2));
/// ```
pub const INSPECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A snapshot of a live deployment, returned by [`inspect`].
///
/// Its `Display` is the table `examples/top.rs` prints.
///
/// # Examples
///
/// ```
/// use worker_events::{Events, Options, Wid, inspect};
/// let dir = std::env::temp_dir().join(format!("we-doc-snap-{}", std::process::id()));
/// let path = dir.join("ev.sock");
/// let events = Events::new(Options::new(&path).workers(2)).unwrap();
/// let mut w = events.init_worker(Wid::Worker(0)).unwrap(); // the broker
/// // The broker answers from its event loop: inspect from another thread meanwhile.
/// let inspector = std::thread::spawn(move || inspect(&path));
/// while !inspector.is_finished() {
///     w.wait(Some(std::time::Duration::from_millis(10))).unwrap();
/// }
/// let snap = inspector.join().unwrap().unwrap();
/// assert_eq!(snap.broker, Wid::Worker(0));
/// assert_eq!(snap.broker_pid, std::process::id());
/// let s0 = snap.slot(Wid::Worker(0)).unwrap();
/// assert!(s0.alive && s0.broker && s0.pid == Some(std::process::id()));
/// assert!(!snap.slot(Wid::Worker(1)).unwrap().alive); // the inspector took no slot
/// println!("{snap}");
/// # drop(w); let _ = std::fs::remove_dir_all(dir);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The data path the broker runs.
    pub transport: Transport,
    /// The `workers` option of the deployment.
    pub workers: u32,
    /// Whether the privileged-agent slot exists (it is the slot after the workers).
    pub agent: bool,
    /// The serving broker.
    pub broker: Wid,
    /// Its process id (the process that answered).
    pub broker_pid: u32,
    /// Its election epoch (+1 at every election).
    pub epoch: u64,
    /// Every slot, workers first, then the privileged agent.
    pub slots: Vec<SlotSnapshot>,
    /// Every ring `from -> to` with `from != to` (shared memory only; empty on the socket
    /// transport, whose queues live in the broker's and workers' private memory).
    pub rings: Vec<RingSnapshot>,
    /// The unique-event dedup table (shared memory only).
    pub dedup: Option<DedupSnapshot>,
}

/// One slot (worker id) of a [`Snapshot`].
///
/// # Examples
///
/// ```
/// # fn show(snap: &worker_events::Snapshot) {
/// for s in &snap.slots {
///     println!("{:?} pid {:?} alive {} broker {}", s.wid, s.pid, s.alive, s.broker);
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotSnapshot {
    /// The worker id.
    pub wid: Wid,
    /// The pid of the process holding it, as the kernel reported it to the broker when the
    /// worker connected (`SO_PEERCRED`); `None` when no worker of this id is attached to the
    /// broker (the broker's own slot carries the broker's pid).
    pub pid: Option<u32>,
    /// A live process holds the id (its lock byte in `<listening>.lock` is held).
    pub alive: bool,
    /// This slot is the serving broker.
    pub broker: bool,
    /// Attaches of this worker id so far (the slot header's count; shared memory only).
    pub attaches: Option<u64>,
    /// The owner sleeps (or is armed for an external poller): a publisher wakes it through
    /// its eventfd (shared memory only; false otherwise).
    pub parked: bool,
    /// Wake-ups written to this slot's eventfd so far, by every publisher, over every
    /// incarnation of the slot (the slot header's count; shared memory only). A count that
    /// grows by about one per event means the owner sleeps between events (parked
    /// delivery, a system call per event on each side); a flat count under load means it
    /// is busy or busy-polling.
    pub wakeups: Option<u64>,
    /// What the broker's outbound data queue holds for this worker: `(frames, bytes)` not
    /// completely written to its connection (socket transport; `None` on shared memory,
    /// where events go through the rings, and for the broker's own slot). Frames are events
    /// and `lost` notices. A worker's own queue towards the broker lives in its private
    /// memory: its [`Stats`](crate::stats::Stats) report it.
    pub broker_queue: Option<(u64, u64)>,
}

/// One ring `from -> to` of a [`Snapshot`] (shared memory).
///
/// # Examples
///
/// ```
/// # fn show(snap: &worker_events::Snapshot) {
/// for r in snap.rings.iter().filter(|r| r.depth > 0 || r.lost > 0) {
///     println!("{:?} -> {:?}: {} queued, {} lost", r.from, r.to, r.depth, r.lost);
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RingSnapshot {
    /// The producer.
    pub from: Wid,
    /// The consumer.
    pub to: Wid,
    /// Events committed to the ring and not yet consumed (the consumer's inbound depth; the
    /// producer's private backlog is not in shared memory). With broadcast rings
    /// (`Options::broadcast_capacity`), also the events for this consumer committed in the
    /// producer's broadcast ring past the consumer's cursor.
    pub depth: u64,
    /// Events the consumer has consumed from this ring, ever. With broadcast rings, plus the
    /// records of the producer's broadcast ring the consumer has read past (its cursor's
    /// next message number: it counts the unique events for other workers it skipped, and
    /// jumps over what it received through this ring while diverted).
    pub consumed: u64,
    /// Events the producer dropped for this consumer (cumulative).
    pub lost: u64,
    /// Of which the consumer has been told (through `lost` notices).
    pub lost_reported: u64,
    /// The producer waits for space in this ring (it holds a backlog for it).
    pub waiting_for_space: bool,
}

/// The dedup table's fill in a [`Snapshot`] (shared memory).
///
/// # Examples
///
/// ```
/// # fn show(snap: &worker_events::Snapshot) {
/// if let Some(d) = snap.dedup {
///     println!("{} live unique hashes in {} entries", d.live, d.entries);
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DedupSnapshot {
    /// Hashes recorded and not yet expired (`unique_timeout`).
    pub live: u64,
    /// Entries of the table (at least twice `unique_capacity`).
    pub entries: u64,
    /// Unique events dropped as duplicates, region-wide.
    pub duplicates: u64,
    /// Unique events delivered unrecorded (a full probe window), region-wide.
    pub unrecorded: u64,
}

impl Snapshot {
    /// The slot of `wid`, if the deployment has it.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn show(snap: &worker_events::Snapshot) {
    /// let alive = snap.slot(worker_events::Wid::Worker(0)).is_some_and(|s| s.alive);
    /// # }
    /// ```
    pub fn slot(&self, wid: Wid) -> Option<&SlotSnapshot> {
        self.slots.iter().find(|s| s.wid == wid)
    }

    /// The ring `from -> to`, if there is one (shared memory, `from != to`).
    ///
    /// # Examples
    ///
    /// ```
    /// # fn show(snap: &worker_events::Snapshot) {
    /// use worker_events::Wid;
    /// let queued = snap.ring(Wid::Worker(0), Wid::Worker(1)).map_or(0, |r| r.depth);
    /// # }
    /// ```
    pub fn ring(&self, from: Wid, to: Wid) -> Option<&RingSnapshot> {
        self.rings.iter().find(|r| r.from == from && r.to == to)
    }
}

/// Inspect the deployment listening on `listening` (the [`Options`](crate::options::Options)
/// socket path): every slot (worker id, pid, alive, broker), the broker and its epoch, and
/// on shared memory every ring's depth and lost counters and the dedup table's fill. Takes no
/// worker slot, writes nothing, and gives up after [`INSPECT_TIMEOUT`].
///
/// How it works, and why it is safe against production:
/// * **Authenticated like a worker.** It connects to the control socket; the broker checks
///   its uid (`SO_PEERCRED`) exactly as a worker's (a foreign uid gets a refusal), and the
///   inspector checks the broker's uid in turn (it must be our own).
/// * **No slot.** It sends one INSPECT request instead of HELLO: the broker answers with its
///   view (its slot, pid and epoch, the options, and the pid of every attached worker as the
///   kernel reported it at accept) and, on shared memory, the region memfd; then it closes
///   the connection. Every worker id stays free for workers.
/// * **Read-only.** The region is mapped `PROT_READ` (a store would fault; the memfd's seals
///   already forbid resizing it). Liveness is read from the lock file (`<listening>.lock`)
///   with `F_OFD_GETLK` queries, which take no lock.
/// * **Bounded.** One connection, one request, one reply of bounded size, a
///   [`INSPECT_TIMEOUT`] deadline on the exchange; each ring's depth walk stops within one
///   ring's worth of records; the dedup scan reads each entry once.
/// * **Untrusted input.** The region is written by other processes: the inspector validates
///   its header against the geometry computed from the broker's options (as a worker does
///   on attach), loads every word once, and only reports what it read (a corrupt ring reads
///   as depth 0).
///
/// The memfd a broker hands over is its own read-write descriptor: a process of the same uid
/// could map it writable, but such a process can already reach it through
/// `/proc/<pid>/fd` of any worker, so this grants nothing new.
///
/// Wake-ups: every publisher counts the eventfd writes it makes in the woken slot's header
/// ([`SlotSnapshot::wakeups`]); with the wake handshake's shared state
/// ([`SlotSnapshot::parked`], [`RingSnapshot::waiting_for_space`]).
///
/// The broker answers from its event loop, so call this from another process (or thread)
/// than the broker's.
///
/// # Errors
/// * [`Error::AttachRefused`]: the broker refused (a foreign uid, a build of another
///   control protocol version, no data path yet), or its reply is malformed;
/// * [`Error::Io`]: no broker listens there, the process there runs as another uid, it did
///   not answer within [`INSPECT_TIMEOUT`], or the lock file cannot be read;
/// * [`Error::CorruptRegion`]: the region it handed over does not match its options.
///
/// # Examples
///
/// ```
/// let e = worker_events::inspect("/nonexistent/ev.sock").unwrap_err();
/// assert!(e.to_string().contains("control socket"), "{e}");
/// ```
/// A live deployment: see [`Snapshot`].
pub fn inspect(listening: impl AsRef<Path>) -> Result<Snapshot> {
    let path = listening.as_ref();
    let reply = control::inspect_request(path, INSPECT_TIMEOUT)?;
    let lock =
        sys::open_read_only_nofollow(&control::lock_path(path)).map_err(|e| Error::io("opening the lock file", e))?;
    let geo = Geometry::with_broadcast(
        reply.workers,
        reply.agent,
        reply.ring_capacity,
        reply.unique_capacity,
        reply.broadcast_capacity,
    );
    let pid_of = |slot: u32| {
        if slot == reply.serving_slot {
            Some(reply.serving_pid)
        } else {
            reply.attached.iter().find(|a| a.slot == slot).map(|a| a.pid)
        }
    };
    let region = match reply.region_fd {
        Some(fd) => Some(Region::open_read_only(fd, geo)?),
        None => None,
    };
    let slots = (0..geo.slots)
        .map(|slot| {
            let view = region.as_ref().map(|r| r.slot_view(slot));
            SlotSnapshot {
                wid: geo.wid_of(slot),
                pid: pid_of(slot),
                alive: sys::byte_locked_by_other(std::os::fd::AsFd::as_fd(&lock), 1 + u64::from(slot)),
                broker: slot == reply.serving_slot,
                attaches: view.map(|v| v.attaches),
                wakeups: view.map(|v| v.wakeups),
                broker_queue: reply.attached.iter().find(|a| a.slot == slot).and_then(|a| a.queued),
                parked: view.is_some_and(|v| v.parked),
            }
        })
        .collect();
    let mut rings = Vec::new();
    let mut dedup = None;
    if let Some(r) = &region {
        for (p, c) in (0..geo.slots).flat_map(|p| (0..geo.slots).map(move |c| (p, c))).filter(|(p, c)| p != c) {
            let v = r.ring(p, c).observe();
            // Per-publisher topology: what waits for `c` in `p`'s broadcast ring counts too.
            let (bcast, bcast_read) = if geo.bcast_capacity > 0 {
                let b = r.bcast(p);
                (b.unread_for(c as usize), b.released_seq(c as usize))
            } else {
                (0, 0)
            };
            rings.push(RingSnapshot {
                from: geo.wid_of(p),
                to: geo.wid_of(c),
                depth: v.depth + bcast,
                consumed: v.consumed.saturating_add(bcast_read),
                lost: v.lost,
                lost_reported: v.lost_seen,
                waiting_for_space: v.want_space,
            });
        }
        let (duplicates, unrecorded) = r.unique_counters();
        let live = r.dedup().fill(sys::monotonic_ns()) as u64;
        dedup = Some(DedupSnapshot { live, entries: geo.dedup_capacity as u64, duplicates, unrecorded });
    }
    Ok(Snapshot {
        transport: if region.is_some() { Transport::SharedMemory } else { Transport::Socket },
        workers: reply.workers,
        agent: reply.agent,
        broker: geo.wid_of(reply.serving_slot),
        broker_pid: reply.serving_pid,
        epoch: reply.epoch,
        slots,
        rings,
        dedup,
    })
}

fn wid_label(w: Wid) -> String {
    match w {
        Wid::Worker(i) => format!("w{i}"),
        Wid::PrivilegedAgent => "agent".into(),
    }
}

impl fmt::Display for Snapshot {
    /// A `top`-like table: a summary line, one line per slot (its inbound and outbound ring
    /// totals on shared memory), then the dedup table's fill.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Snapshot { broker_pid, .. } = self;
        writeln!(
            f,
            "broker {} (pid {broker_pid}) epoch {} transport {:?} workers {}{}",
            wid_label(self.broker),
            self.epoch,
            self.transport,
            self.workers,
            if self.agent { " + agent" } else { "" }
        )?;
        writeln!(
            f,
            "{:<6} {:>8} {:<5} {:<6} {:>5} {:>6} {:>9} {:>9} {:>8} {:>10} {:>12}",
            "SLOT",
            "PID",
            "ALIVE",
            "ROLE",
            "GEN",
            "PARKED",
            "IN_DEPTH",
            "OUT_DEPTH",
            "LOST_IN",
            "WAKEUPS",
            "BROKER_QUEUE"
        )?;
        for s in &self.slots {
            let sum = |pick: &dyn Fn(&RingSnapshot) -> Option<u64>| self.rings.iter().filter_map(pick).sum::<u64>();
            let inbound = sum(&|r| (r.to == s.wid).then_some(r.depth));
            let outbound = sum(&|r| (r.from == s.wid).then_some(r.depth));
            let lost = sum(&|r| (r.to == s.wid).then_some(r.lost));
            writeln!(
                f,
                "{:<6} {:>8} {:<5} {:<6} {:>5} {:>6} {:>9} {:>9} {:>8} {:>10} {:>12}",
                wid_label(s.wid),
                s.pid.map_or("-".into(), |p| p.to_string()),
                if s.alive { "yes" } else { "no" },
                if s.broker { "broker" } else { "" },
                s.attaches.map_or("-".into(), |g| g.to_string()),
                if s.parked { "yes" } else { "" },
                inbound,
                outbound,
                lost,
                s.wakeups.map_or("-".into(), |n| n.to_string()),
                s.broker_queue.map_or("-".into(), |(f, b)| format!("{f}/{b}B"))
            )?;
        }
        if let Some(d) = self.dedup {
            writeln!(
                f,
                "dedup: {} live of {} entries, {} duplicates, {} unrecorded",
                d.live, d.entries, d.duplicates, d.unrecorded
            )?;
        }
        Ok(())
    }
}
