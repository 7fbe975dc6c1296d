//! What both multi-process benches share: re-executing the bench binary in a child role,
//! pinning, reaping, temp dirs, the load average, and criterion's command-line filter.
//! (Each bench uses a subset; the rest is not dead code in the other one.)
#![allow(dead_code)]

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The child's role; set means "run as a child", checked first thing in `main`.
pub const ROLE_ENV: &str = "WE_BENCH_ROLE";
/// The CPU the child pins itself to.
pub const CPU_ENV: &str = "WE_BENCH_CPU";
/// Inherited descriptors, comma-separated.
pub const FD_ENV: &str = "WE_BENCH_FDS";
/// The control socket path of the library's children.
pub const SOCK_ENV: &str = "WE_BENCH_SOCK";
/// The bench process's pid: a child whose parent is not it exits at once.
pub const PPID_ENV: &str = "WE_BENCH_PPID";

pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

pub fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cpu < CPU_SETSIZE.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        eprintln!("sched_setaffinity({cpu}) failed: {}", std::io::Error::last_os_error());
    }
}

/// Pin the bench process to the first allowed CPU and return the second one for the
/// child (None, and no pinning, with a single CPU).
pub fn pin_pair() -> Option<usize> {
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        eprintln!("only one CPU available: not pinning");
        return None;
    }
    pin(cpus[0]);
    eprintln!("pinning: bench process on CPU {}, peer process on CPU {}", cpus[0], cpus[1]);
    Some(cpus[1])
}

/// The command re-executing this binary in `role`, pinned to `cpu`, inheriting `fds`.
pub fn child_command(role: &str, cpu: Option<usize>, fds: &[RawFd], sock: Option<&Path>) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.env(ROLE_ENV, role).env(PPID_ENV, std::process::id().to_string());
    if let Some(c) = cpu {
        cmd.env(CPU_ENV, c.to_string());
    }
    if !fds.is_empty() {
        cmd.env(FD_ENV, fds.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(","));
    }
    if let Some(s) = sock {
        cmd.env(SOCK_ENV, s);
    }
    let fds = fds.to_vec();
    // SAFETY: the closure only calls fcntl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// First thing in a child: die with the bench process, refuse to run under another
/// parent, pin to the CPU it was given. Returns the inherited descriptors.
pub fn child_prologue() -> Vec<RawFd> {
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let ppid: u32 = std::env::var(PPID_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: plain getppid.
    if unsafe { libc::getppid() } as u32 != ppid {
        std::process::exit(1);
    }
    if let Some(cpu) = std::env::var(CPU_ENV).ok().and_then(|s| s.parse().ok()) {
        pin(cpu);
    }
    std::env::var(FD_ENV).map(|s| s.split(',').filter_map(|f| f.parse().ok()).collect()).unwrap_or_default()
}

/// Wait for `child` to exit (up to 5 s), then kill it.
pub fn reap(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            if !st.success() {
                eprintln!("peer process exited with {st}");
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("peer process did not exit; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "we-bench-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating the temp dir");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Whether the benchmark `id` passes the filter given on the command line
/// (`cargo bench --bench NAME -- FILTER`, a substring as for criterion).
pub fn wanted(id: &str) -> bool {
    // Options of criterion's command line that take a value.
    const WITH_VALUE: &[&str] = &[
        "-s",
        "--save-baseline",
        "-b",
        "--baseline",
        "--load-baseline",
        "-c",
        "--color",
        "--output-format",
        "--plotting-backend",
        "--profile-time",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--format",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if WITH_VALUE.contains(&a) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return id.contains(a);
        }
    }
    true
}
