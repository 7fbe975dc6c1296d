//! What a hostile peer of the same uid (here: the test process, the parent of its children)
//! reaches of a worker through `/proc`: its descriptors (`/proc/<pid>/fd/N`; the open file
//! description itself through `pidfd_getfd`), its shared region (the memfd, opened and mapped
//! read-write), and its CPU time (`/proc/<pid>/stat`).

// The words of another process's region: std atomics (the crate's loom shim is for the
// crate's own code).
#![allow(clippy::disallowed_types)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// The descriptors of process `pid` whose `/proc/<pid>/fd/N` link satisfies `pred`.
pub fn fds_linking(pid: u32, pred: impl Fn(&str) -> bool) -> Vec<RawFd> {
    let mut v: Vec<RawFd> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/<pid>/fd")
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| pred(&l.to_string_lossy())))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// Every eventfd `pid` holds (a worker on shared memory holds one per slot).
pub fn eventfds_of(pid: u32) -> Vec<RawFd> {
    fds_linking(pid, |l| l == "anon_inode:[eventfd]")
}

/// A duplicate of descriptor `fd` of process `pid` (a child of this process): the same open
/// file description, so that flags set on it are set for every holder.
pub fn pidfd_getfd(pid: u32, fd: RawFd) -> OwnedFd {
    // SAFETY: raw syscalls with integer arguments; each result is checked.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        assert!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
        let pidfd = OwnedFd::from_raw_fd(pidfd as RawFd);
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        assert!(got >= 0, "pidfd_getfd({pid}, {fd}): {}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(got as RawFd)
    }
}

/// The counter of the eventfd `fd` of this process, from `/proc/self/fdinfo`.
pub fn eventfd_count(fd: RawFd) -> u64 {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
    let hex = info
        .lines()
        .find_map(|l| l.strip_prefix("eventfd-count:"))
        .unwrap_or_else(|| panic!("no eventfd-count in {info:?}"))
        .trim();
    u64::from_str_radix(hex, 16).expect("eventfd-count")
}

/// The largest value an eventfd counter holds: a write that would pass it blocks (or fails
/// with `EAGAIN` without `O_NONBLOCK`).
pub const EVENTFD_MAX: u64 = 0xffff_ffff_ffff_fffe;

/// Play the hostile peer on eventfd `fd` (a duplicate of another process's): clear
/// `O_NONBLOCK` on its open file description and fill its counter to [`EVENTFD_MAX`].
pub fn clear_nonblock_and_fill(fd: &OwnedFd) {
    let raw = fd.as_raw_fd();
    // Fill first, while writes still fail rather than block (a publisher may add meanwhile).
    loop {
        let count = eventfd_count(raw);
        if count == EVENTFD_MAX {
            break;
        }
        let add = EVENTFD_MAX - count;
        // SAFETY: writes 8 bytes from a live u64.
        let _ = unsafe { libc::write(raw, (&add as *const u64).cast(), 8) };
    }
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(raw, libc::F_GETFL);
        assert!(fl >= 0);
        assert_eq!(libc::fcntl(raw, libc::F_SETFL, fl & !libc::O_NONBLOCK), 0);
        assert_eq!(libc::fcntl(raw, libc::F_GETFL) & libc::O_NONBLOCK, 0);
    }
}

/// Whether the open file description of `fd` is non-blocking.
pub fn is_nonblocking(fd: &OwnedFd) -> bool {
    // SAFETY: fcntl F_GETFL on a descriptor we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) & libc::O_NONBLOCK != 0 }
}

/// User plus system CPU time of process `pid` (all its threads) so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command (which may hold spaces) start at field 3 (`state`); utime and
    // stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').expect("stat format").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// Time the threads of process `pid` have spent on a CPU or runnable and waiting for one
/// (`/proc/<pid>/task/*/schedstat`, nanoseconds, summed): what they *asked* of the CPUs,
/// which a loaded machine does not hide the way it hides CPU time. `None` without
/// schedstats. (A thread that exits between two samples makes the sum drop: compare
/// samples with `saturating_sub`.)
pub fn cpu_demand(pid: u32) -> Option<Duration> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(t.path().join("schedstat")) else { continue };
        let mut f = text.split_whitespace().map(|x| x.parse::<u64>().ok());
        let (run, wait) = (f.next()??, f.next()??);
        total += run + wait;
    }
    Some(Duration::from_nanos(total))
}

/// A worker's shared region, mapped read-write in this process through `/proc/<pid>/fd/N`.
pub struct MappedRegion {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for MappedRegion {}

impl MappedRegion {
    /// Map the region (the `worker-events` memfd) that process `pid` holds.
    pub fn of(pid: u32) -> MappedRegion {
        let fds = fds_linking(pid, |l| l.starts_with("/memfd:worker-events"));
        let fd = *fds.first().unwrap_or_else(|| panic!("process {pid} holds no worker-events memfd"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/fd/{fd}"))
            .expect("open the region through /proc");
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: a fresh shared mapping of the whole file; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        MappedRegion { ptr: ptr.cast(), len }
    }

    /// The `parked` flag of `slot` (shm-layout.md, section 4: the first word of slot header
    /// `slot`, at `256 + 128 * slot`).
    pub fn parked(&self, slot: u32) -> &AtomicU32 {
        let off = 256 + 128 * slot as usize;
        assert!(off + 4 <= self.len);
        // SAFETY: in bounds, 4-aligned (the mapping is page-aligned), and the word is only
        // ever accessed as an atomic by every process.
        unsafe { &*(self.ptr.add(off) as *const AtomicU32) }
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`, not used after this.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The scheduling state of process `pid`'s main thread (`/proc/<pid>/stat` field 3): `R`,
/// `S`, `D`, `T` (stopped by a signal), `Z`, ...
pub fn state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    let rest = stat.rsplit_once(')').expect("stat format").1;
    rest.split_whitespace().next().and_then(|s| s.chars().next()).expect("stat state")
}

/// Wait until the kernel reports `pid` stopped (after a SIGSTOP): from then on its main
/// thread runs no instruction until SIGCONT. Panics after 10 s.
pub fn wait_stopped(pid: u32) {
    let t0 = std::time::Instant::now();
    while state(pid) != 'T' {
        assert!(t0.elapsed() < Duration::from_secs(10), "pid {pid} not stopped 10 s after SIGSTOP");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The descriptors registered in process `pid`'s epoll set(s) that are eventfds: the `tfd`
/// lines of `/proc/<pid>/fdinfo/<epoll fd>`, kept where `/proc/<pid>/fd/<tfd>` is an eventfd.
pub fn eventfds_in_epoll(pid: u32) -> Vec<RawFd> {
    let eventfds = eventfds_of(pid);
    let mut v = Vec::new();
    for ep in fds_linking(pid, |l| l == "anon_inode:[eventpoll]") {
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{ep}")).expect("fdinfo of an epoll fd");
        for line in info.lines().filter_map(|l| l.strip_prefix("tfd:")) {
            let tfd: RawFd = line.split_whitespace().next().and_then(|t| t.parse().ok()).expect("tfd number");
            if eventfds.contains(&tfd) {
                v.push(tfd);
            }
        }
    }
    v.sort_unstable();
    v
}
