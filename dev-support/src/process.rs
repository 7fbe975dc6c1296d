//! Multi-process harnesses: the current binary re-executed in a child role (never `fork()` in
//! a process that has threads), descriptors passed to it, its life tied to the parent's, its
//! reaping, and CPU pinning.
//!
//! The parent builds the child's command with [`reexec`] (which records the parent's pid in
//! [`PARENT_PID_ENV`]) and, if the child needs descriptors, [`inherit_fds`]; the child calls
//! [`die_with_parent`] first thing and [`inherited_fds`] to find its descriptors.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The parent's pid, set by [`reexec`] and checked by [`die_with_parent`].
pub const PARENT_PID_ENV: &str = "WE_DEV_PARENT_PID";
/// The descriptors a child inherits, comma-separated, set by [`inherit_fds`].
pub const INHERITED_FDS_ENV: &str = "WE_DEV_FDS";

/// A command that re-executes the current binary (`/proc/self/exe`), with the caller's pid in
/// [`PARENT_PID_ENV`]. The caller adds the role (an environment variable or arguments).
pub fn reexec() -> std::io::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(PARENT_PID_ENV, std::process::id().to_string());
    Ok(cmd)
}

/// Let the child of `cmd` inherit `fds` under the same numbers: their close-on-exec flag is
/// cleared between `fork` and `exec` (in the child only), and their numbers are passed in
/// [`INHERITED_FDS_ENV`] for [`inherited_fds`]. The descriptors must stay open in the parent
/// until the child is spawned.
pub fn inherit_fds<'c>(cmd: &'c mut Command, fds: &[RawFd]) -> &'c mut Command {
    if fds.is_empty() {
        return cmd;
    }
    cmd.env(INHERITED_FDS_ENV, fds.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(","));
    let fds = fds.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
    }
}

/// In a child: the descriptors [`inherit_fds`] passed (empty if none).
pub fn inherited_fds() -> Vec<RawFd> {
    parse_fds(&std::env::var(INHERITED_FDS_ENV).unwrap_or_default())
}

fn parse_fds(list: &str) -> Vec<RawFd> {
    list.split(',').filter_map(|f| f.trim().parse().ok()).collect()
}

/// First thing in a child started by [`reexec`]: ask the kernel for a SIGKILL when the parent
/// dies, then check that the parent is still the process that spawned us (it may have died
/// before the request, and we would then have been re-parented). `Err` means: exit now.
pub fn die_with_parent() -> Result<(), String> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(format!("prctl(PR_SET_PDEATHSIG): {}", std::io::Error::last_os_error()));
    }
    // SAFETY: plain getppid, which cannot fail.
    let ppid = unsafe { libc::getppid() } as u32;
    check_parent(std::env::var(PARENT_PID_ENV).ok().as_deref(), ppid)
}

fn check_parent(expected: Option<&str>, ppid: u32) -> Result<(), String> {
    match expected.map(|s| s.parse::<u32>()) {
        Some(Ok(p)) if p == ppid => Ok(()),
        Some(Ok(p)) => Err(format!("the parent process {p} is gone")),
        _ => Err(format!("{PARENT_PID_ENV} is not set to a pid: not started by dev_support::process::reexec")),
    }
}

/// Wait up to `grace` for `child` to exit by itself, then kill it. Returns its exit status if
/// it exited by itself, `None` if it had to be killed (or could not be waited for).
pub fn reap(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// The CPUs this process may run on (its affinity mask), ascending; empty if it cannot be
/// read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data (all-zero is the empty set); sched_getaffinity writes at
    // most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Pin the calling thread (the whole process if called before it starts threads, which
/// inherit the mask) to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("CPU {cpu} out of range")));
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cpu < CPU_SETSIZE (checked).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_to_an_allowed_cpu_and_back() {
        // On a thread of its own: the mask of the test runner's other threads stays put.
        std::thread::spawn(|| {
            let cpus = allowed_cpus();
            assert!(!cpus.is_empty());
            let last = *cpus.last().unwrap();
            pin_to_cpu(last).unwrap();
            assert_eq!(allowed_cpus(), vec![last]);
            assert!(pin_to_cpu(libc::CPU_SETSIZE as usize).is_err());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_child_inherits_descriptors_and_exits_with_its_status() {
        // /bin/sh as the child: it reads its inherited descriptor and checks the env vars.
        let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        let fd = w.as_raw_fd();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("[ \"${INHERITED_FDS_ENV}\" = {fd} ] && [ -n \"${PARENT_PID_ENV}\" ] && echo hi >&{fd}"))
            .env(PARENT_PID_ENV, std::process::id().to_string());
        inherit_fds(&mut cmd, &[fd]);
        let mut child = cmd.spawn().unwrap();
        drop(w);
        let st = reap(&mut child, Duration::from_secs(10)).expect("exits by itself");
        assert!(st.success(), "{st}");
        let mut got = String::new();
        use std::io::Read;
        (&r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "hi\n");
    }

    #[test]
    fn reap_kills_a_child_that_does_not_exit() {
        let mut child = Command::new("/bin/sleep").arg("30").spawn().unwrap();
        let t = Instant::now();
        assert_eq!(reap(&mut child, Duration::from_millis(50)), None);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(child.try_wait().unwrap().is_some(), "reaped");
    }

    #[test]
    fn a_child_only_runs_under_the_parent_that_started_it() {
        assert_eq!(check_parent(Some("42"), 42), Ok(()));
        assert!(check_parent(Some("42"), 1).unwrap_err().contains("42 is gone"));
        assert!(check_parent(None, 1).is_err());
        assert!(check_parent(Some("x"), 1).is_err());
    }

    #[test]
    fn inherited_fds_parses_the_list() {
        assert_eq!(parse_fds("3,7, 12"), vec![3, 7, 12]);
        assert_eq!(parse_fds(""), Vec::<RawFd>::new());
    }
}
