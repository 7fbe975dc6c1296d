//! Thin wrappers over the system calls this crate makes; with `sys/fork.rs`, the only code that calls libc or
//! nix directly. Every descriptor is created close-on-exec and (where it can block)
//! non-blocking; `WouldBlock` is a normal state, not an error.

mod fork;

pub(crate) use fork::{ParentOnly, forks};

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Call a libc function, turning `-1` into `io::Error::last_os_error()`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: every call site passes valid descriptors and pointers to live buffers of
        // the stated lengths; see the wrapper around each call.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 { Err(io::Error::last_os_error()) } else { Ok(res) }
    }};
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful syscall and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A close-on-exec eventfd used as an edge source only: its counter is 1 from creation and
/// no process of ours ever reads or adds to it; a wake-up writes the value 0.
///
/// **Why a write of 0.** The eventfd's open file description is shared by every worker of
/// the deployment (passed over the control socket), so any of them, or any process of the
/// same uid through `pidfd_getfd`, can clear its `O_NONBLOCK` and fill its counter
/// (`0xffff_ffff_ffff_fffe`): then a `write` of any value `v > 0` blocks until someone reads
/// the counter, and nobody does. The kernel blocks a write only while `count + v` would pass
/// that maximum, which for `v == 0` never holds: a write of 0 never blocks and never fails
/// with `EAGAIN`, whatever the flags and the counter, and it still runs the eventfd's wake-up
/// callbacks, which is all an edge-triggered epoll registration needs (one edge per write),
/// as long as the counter is not 0 (epoll reports the fd only if it polls readable). Hence
/// the counter starts at 1 and nobody of ours reads it.
///
/// Alternatives weighed and rejected: `poll(POLLOUT, 0)` before a write of 1 (a peer can
/// fill the counter between the two calls; one more syscall per wake-up); `F_GETFL` and
/// restoring `O_NONBLOCK` (the same race, two more syscalls); reading the counter down at
/// the receiver (`read` blocks on a zero counter once `O_NONBLOCK` is cleared, and races with
/// the peer's refill); another primitive (a datagram socket with `MSG_DONTWAIT` cannot
/// block either, but needs a read per wake-up once its buffer fills, and changes what the
/// broker hands out). What a hostile peer *can* still do is read the counter down to 0:
/// writes of 0 then raise no readiness, and receivers fall back on their periodic re-check
/// (`RECHECK_PERIOD`, 100 ms, in `worker/poll.rs`): a delay, never a hang or a spin.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd, counter 1 (see the type's docs), non-blocking for its creator's sake
    /// (nothing relies on the flag).
    pub(crate) fn new() -> io::Result<Self> {
        let fd = syscall!(eventfd(1, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?;
        Ok(EventFd(owned(fd)))
    }

    pub(crate) fn from_owned(fd: OwnedFd) -> Self {
        EventFd(fd)
    }

    /// One readiness edge for an edge-triggered epoll registration: a write of the value 0,
    /// which never blocks and never changes the counter, whatever another process did to
    /// the flags or the counter (see the type's docs). One syscall, as a write of 1 was.
    pub(crate) fn notify(&self) {
        let zero: u64 = 0;
        let _ = syscall!(write(self.0.as_raw_fd(), (&zero as *const u64).cast(), 8));
    }

    /// Is `fd` an eventfd? `/proc/self/fd/N` names it (`anon_inode:[eventfd]`); without
    /// `/proc` (a sandbox), [`is_eventfd_without_proc`] decides.
    pub(crate) fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
        match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
            Ok(p) => p.as_os_str().as_bytes() == b"anon_inode:[eventfd]",
            Err(_) => is_eventfd_without_proc(fd),
        }
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// An epoll set. Tokens are `u64`s chosen by the caller.
#[derive(Debug)]
pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub(crate) fn new() -> io::Result<Self> {
        let fd = syscall!(epoll_create1(libc::EPOLL_CLOEXEC))?;
        Ok(Epoll(owned(fd)))
    }

    pub(crate) fn add(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        syscall!(epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev)).map(drop)
    }

    /// Register `fd` edge-triggered (`EPOLLIN | EPOLLET`): every write to an eventfd is one
    /// edge, reported by one `epoll_wait` on this set and then gone, so the counter never
    /// needs a `read` to stop the set from staying readable.
    pub(crate) fn add_edge_triggered(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: token };
        syscall!(epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev)).map(drop)
    }

    pub(crate) fn delete(&self, fd: BorrowedFd<'_>) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        let _ = syscall!(epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd.as_raw_fd(), &mut ev));
    }

    /// Wait up to `timeout_ms` (-1 = forever); fills `out` with the ready tokens.
    pub(crate) fn wait(&self, out: &mut Vec<u64>, timeout_ms: i32) -> io::Result<()> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 32];
        out.clear();
        let n = match syscall!(epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, timeout_ms)) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        out.extend(evs[..n].iter().map(|e| e.u64));
        Ok(())
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Create a memfd of `size` bytes, sealed against shrinking, growing and further sealing.
pub(crate) fn memfd_sealed(size: usize) -> io::Result<OwnedFd> {
    let name = c"worker-events";
    let fd = owned(syscall!(memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING))?);
    syscall!(ftruncate(fd.as_raw_fd(), size as libc::off_t))?;
    syscall!(fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL))?;
    Ok(fd)
}

/// Size of the file behind `fd`, and whether it carries the seals `memfd_sealed` adds.
pub(crate) fn memfd_size_and_sealed(fd: BorrowedFd<'_>) -> io::Result<(u64, bool)> {
    // SAFETY: zeroed `stat` is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    syscall!(fstat(fd.as_raw_fd(), &mut st))?;
    let seals = syscall!(fcntl(fd.as_raw_fd(), libc::F_GET_SEALS)).unwrap_or(0);
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    Ok((st.st_size as u64, seals & want == want))
}

/// Open the lock file without following a symbolic link (`O_NOFOLLOW`), creating it (mode
/// 0600) if it does not exist. `true` with it when this call created it.
pub(crate) fn open_lock_file(path: &Path) -> io::Result<(OwnedFd, bool)> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let base = libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    let mode = 0o600 as libc::c_uint;
    match syscall!(open(c.as_ptr(), base | libc::O_CREAT | libc::O_EXCL, mode)) {
        Ok(fd) => Ok((owned(fd), true)),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok((owned(syscall!(open(c.as_ptr(), base, mode))?), false)),
        Err(e) => Err(e),
    }
}

/// Identity, owner and mode of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub uid: u32,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
}

impl FileId {
    fn of(st: &libc::stat) -> FileId {
        FileId { dev: st.st_dev, ino: st.st_ino, uid: st.st_uid, mode: st.st_mode }
    }

    /// Same file (device and inode)?
    pub(crate) fn same_file(&self, other: &FileId) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }

    /// A regular file?
    pub(crate) fn is_regular(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
}

/// `fstat` of an open descriptor.
pub(crate) fn fstat_id(fd: BorrowedFd<'_>) -> io::Result<FileId> {
    // SAFETY: zeroed `stat` is valid; the kernel fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    syscall!(fstat(fd.as_raw_fd(), &mut st))?;
    Ok(FileId::of(&st))
}

/// `lstat` of a path (a symbolic link is described, not followed).
pub(crate) fn lstat_id(path: &Path) -> io::Result<FileId> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: zeroed `stat` is valid; the kernel fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    syscall!(lstat(c.as_ptr(), &mut st))?;
    Ok(FileId::of(&st))
}

/// A non-blocking, close-on-exec CLOCK_MONOTONIC timerfd firing every `period`.
pub(crate) fn timerfd(period: std::time::Duration) -> io::Result<OwnedFd> {
    let fd = owned(syscall!(timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC))?);
    timerfd_set(fd.as_fd(), period)?;
    Ok(fd)
}

/// Read (reset) a timerfd's expiry count; nothing if it has not expired.
pub(crate) fn timerfd_read(fd: BorrowedFd<'_>) {
    let mut n = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live 8-byte buffer.
    let _ = unsafe { libc::read(fd.as_raw_fd(), n.as_mut_ptr().cast(), n.len()) };
}

/// Re-arm a timerfd to fire every `period` from now.
pub(crate) fn timerfd_set(fd: BorrowedFd<'_>, period: std::time::Duration) -> io::Result<()> {
    let ts = libc::timespec { tv_sec: period.as_secs() as libc::time_t, tv_nsec: period.subsec_nanos() as _ };
    let spec = libc::itimerspec { it_interval: ts, it_value: ts };
    syscall!(timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut())).map(drop)
}

fn ofd_flock(start: u64, ty: libc::c_int) -> libc::flock {
    // SAFETY: zeroed `flock` is valid; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Take the exclusive open-file-description lock on byte `byte` of the lock file without
/// blocking. `Ok(false)`: another open file description (another live process) holds it.
/// Like `flock`, the kernel releases it when the last descriptor of this description closes
/// (so when the holder dies).
pub(crate) fn try_lock_byte(fd: BorrowedFd<'_>, byte: u64) -> io::Result<bool> {
    let fl = ofd_flock(byte, libc::F_WRLCK);
    match syscall!(fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl)) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Take the exclusive open-file-description lock on the whole file (every byte, past its
/// end too) without blocking. `Ok(false)`: another live process holds some byte of it.
pub(crate) fn try_lock_all(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut fl = ofd_flock(0, libc::F_WRLCK);
    fl.l_len = 0;
    match syscall!(fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl)) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Release this open file description's lock on byte `byte` (no error if it held none).
pub(crate) fn unlock_byte(fd: BorrowedFd<'_>, byte: u64) -> io::Result<()> {
    let fl = ofd_flock(byte, libc::F_UNLCK);
    syscall!(fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl)).map(drop)
}

/// Is any byte of `start..start + len` locked by another open file description?
pub(crate) fn range_locked_by_other(fd: BorrowedFd<'_>, start: u64, len: u64) -> bool {
    let mut fl = ofd_flock(start, libc::F_WRLCK);
    fl.l_len = len as libc::off_t;
    match syscall!(fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl)) {
        Ok(_) => fl.l_type != libc::F_UNLCK as libc::c_short,
        Err(_) => false,
    }
}

/// Is byte `byte` locked by another open file description? Does not disturb the holder.
pub(crate) fn byte_locked_by_other(fd: BorrowedFd<'_>, byte: u64) -> bool {
    let mut fl = ofd_flock(byte, libc::F_WRLCK);
    match syscall!(fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl)) {
        Ok(_) => fl.l_type != libc::F_UNLCK as libc::c_short,
        Err(_) => false,
    }
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn stream_socket() -> io::Result<OwnedFd> {
    let fd = syscall!(socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0))?;
    Ok(owned(fd))
}

/// Bind and listen on `path` (non-blocking). The caller must hold the broker lock: a stale
/// socket file left by a dead broker is removed first. Only a socket nobody listens on (a
/// `connect` fails) is ever removed: a socket that still accepts connections makes this fail
/// (`AddrInUse`), and any other kind of file `AlreadyExists`, rather than delete it.
pub(crate) fn listen_unix(path: &Path) -> io::Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    remove_stale_socket(path)?;
    let fd = stream_socket()?;
    syscall!(bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len))?;
    syscall!(listen(fd.as_raw_fd(), 1024))?;
    Ok(fd)
}

/// Bind and listen on `path`, replacing whatever socket is there, live or not, atomically:
/// bind a temporary name beside it, then `rename` it over `path` (a connecting client finds
/// the old socket or the new one, never none). Used only by a worker that took the broker
/// role over from a stuck broker (its socket still accepts connections into a backlog that
/// nobody reads). Anything at `path` that is not a socket is refused (`AlreadyExists`).
pub(crate) fn listen_unix_over(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; refusing to replace it", path.display()),
            ));
        }
        _ => {}
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.new", pid()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let (addr, len) = sockaddr(&tmp)?;
    let fd = stream_socket()?;
    syscall!(bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len))?;
    let listening = syscall!(listen(fd.as_raw_fd(), 1024)).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = listening {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(fd)
}

/// Remove the socket file at `path` if there is one and nobody listens on it; refuse to
/// touch anything else (a live socket, a socket of another user, any other kind of file).
pub(crate) fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if m.uid() != euid() {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{} is a socket of uid {}, not ours; refusing to replace it", path.display(), m.uid()),
                ));
            }
            // Only a refused connection proves nobody listens: a full backlog (EAGAIN) is a
            // live but slow broker.
            if connect_unix(path).err().and_then(|e| e.raw_os_error()) != Some(libc::ECONNREFUSED) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} still accepts connections; refusing to replace it", path.display()),
                ));
            }
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket; refusing to replace it", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Connect to `path` (non-blocking socket; unix stream connects complete at once or fail).
pub(crate) fn connect_unix(path: &Path) -> io::Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    let fd = stream_socket()?;
    match syscall!(connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len)) {
        Ok(_) => Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(fd),
        Err(e) => Err(e),
    }
}

/// Accept one connection, non-blocking and close-on-exec. `Ok(None)` when none is pending.
pub(crate) fn accept(listener: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    match syscall!(accept4(
        listener.as_raw_fd(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK
    )) {
        Ok(fd) => Ok(Some(owned(fd))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `(pid, uid)` of the peer, vouched for by the kernel (`SO_PEERCRED`).
pub(crate) fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<(i32, u32)> {
    // SAFETY: zeroed ucred is a valid out-parameter.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    syscall!(getsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_PEERCRED,
        (&mut cred as *mut libc::ucred).cast(),
        &mut len
    ))?;
    Ok((cred.pid, cred.uid))
}

/// Effective uid of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Process id.
pub(crate) fn pid() -> u32 {
    std::process::id()
}

/// Send `buf`, attaching `fds` (SCM_RIGHTS) when non-empty. Returns bytes sent.
pub(crate) fn send_with_fds(sock: BorrowedFd<'_>, buf: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [io::IoSlice::new(buf)];
    let cmsgs: &[ControlMessage<'_>] = &[ControlMessage::ScmRights(fds)];
    let cmsgs = if fds.is_empty() { &[][..] } else { cmsgs };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT, None)
        .map_err(io::Error::from)
}

/// Receive into `buf`. With `fds`, descriptors passed with the data are collected there
/// (close-on-exec, room for 256 per call: more than one `SCM_RIGHTS` message carries). Without
/// it the caller wants none: the control buffer has room for one descriptor only (the kernel
/// installs no more than fit), and any received is closed at once and the call fails
/// (`InvalidData`). A truncated control message (`MSG_CTRUNC`: the peer passed more than fit)
/// closes every descriptor the kernel installed for this call and fails too, so none leaks.
/// (`recvmsg` is called through libc: nix refuses to walk the control messages of a
/// truncated buffer, which would leave the installed descriptors open.) `Ok(0)` is end of
/// stream.
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], fds: Option<&mut Vec<OwnedFd>>) -> io::Result<usize> {
    const WIDE: usize = 256;
    // u64 words: aligned for `cmsghdr`.
    let mut space = [0u64; (WIDE * 4 + 64) / 8];
    let room = if fds.is_some() { WIDE } else { 1 };
    // SAFETY: CMSG_SPACE is a pure computation.
    let controllen = (unsafe { libc::CMSG_SPACE((room * std::mem::size_of::<RawFd>()) as u32) } as usize)
        .min(std::mem::size_of_val(&space));
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: zeroed msghdr is valid; the pointers set below outlive the call.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = space.as_mut_ptr().cast();
    mh.msg_controllen = controllen as _;
    let n = syscall!(recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT))? as usize;
    // Take ownership of every descriptor the kernel installed before deciding anything, so
    // that each one is closed on every path below.
    let mut got = Vec::new();
    // SAFETY: the kernel wrote `msg_controllen <= controllen` bytes of well-formed control
    // messages into `space`; CMSG_FIRSTHDR/CMSG_NXTHDR stay within them, and each
    // SCM_RIGHTS message's data holds `(cmsg_len - CMSG_LEN(0)) / 4` descriptors it
    // installed for us (read unaligned).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    got.push(owned(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    if mh.msg_flags & libc::MSG_CTRUNC != 0 {
        drop(got);
        return Err(io::Error::new(io::ErrorKind::InvalidData, "control message truncated (descriptors closed)"));
    }
    match fds {
        Some(fds) => fds.append(&mut got),
        None if !got.is_empty() => {
            let k = got.len();
            drop(got);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{k} descriptor(s) passed where none belong"),
            ));
        }
        None => {}
    }
    Ok(n)
}

/// Is `fd` an eventfd, decided without `/proc`: `fstat` must show an anonymous inode (no
/// file type bits: not a regular file, memfd, pipe, socket or device), and a `write` of an
/// 8-byte zero must succeed, which of the anonymous-inode kinds only an eventfd accepts
/// (epoll, timerfd, signalfd, inotify, pidfd and the others refuse writes, or 8 zero bytes).
/// Adding 0 leaves the counter as it is and never blocks, even if another process cleared
/// `O_NONBLOCK` on the shared open file description (a write blocks only when the counter
/// would pass its maximum); it may wake a waiter once, which every waiter tolerates.
pub(crate) fn is_eventfd_without_proc(fd: BorrowedFd<'_>) -> bool {
    let Ok(id) = fstat_id(fd) else { return false };
    if id.mode & libc::S_IFMT != 0 {
        return false;
    }
    let zero = 0u64;
    matches!(syscall!(write(fd.as_raw_fd(), (&zero as *const u64).cast(), 8)), Ok(8))
}

/// Plain non-blocking write (MSG_NOSIGNAL: a dead peer is EPIPE, not SIGPIPE).
pub(crate) fn send(sock: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    syscall!(send(sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT))
        .map(|n| n as usize)
}

/// A random u64 from the kernel (getrandom), for region ids and hash keys.
pub(crate) fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `v`.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        // Fall back on time and pid: still unique per region instance in practice.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        return t ^ (u64::from(pid()) << 32);
    }
    u64::from_le_bytes(v)
}

/// CLOCK_MONOTONIC now, in nanoseconds (the same clock in every process of the host).
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A memfd of `size` bytes that is NOT sealed (tests of the region validation).
#[cfg(all(test, not(loom)))]
pub(crate) fn memfd_unsealed(size: usize) -> OwnedFd {
    let fd = owned(syscall!(memfd_create(c"x".as_ptr(), libc::MFD_CLOEXEC)).expect("memfd_create"));
    syscall!(ftruncate(fd.as_raw_fd(), size as libc::off_t)).expect("ftruncate");
    fd
}

/// Open `path` read-only, never through a symbolic link (the live inspector's look at the
/// lock file: `F_OFD_GETLK` queries need no write access and take no lock).
pub(crate) fn open_read_only_nofollow(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)?;
    Ok(f.into())
}
