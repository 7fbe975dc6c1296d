//! Raw control-socket peers for the hostile socket tests: a client that passes descriptors
//! (`SCM_RIGHTS`, several control messages in one `sendmsg` if asked), a broker played by
//! the test that welcomes one socket-transport worker, and a count of a process's open
//! descriptors.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::raw::{KIND_HELLO, KIND_WELCOME, protocol_version};

/// Frame kind of a `LOST` notice (broker -> worker on the socket transport).
pub const KIND_LOST: u8 = 8;

/// One frame: `len u32 LE`, kind, body.
pub fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = ((1 + body.len()) as u32).to_le_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(body);
    v
}

/// Open descriptors of process `pid` (entries of `/proc/<pid>/fd`).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).expect("read /proc/<pid>/fd")
}

/// `n` descriptors to pass (each a fresh open of `/dev/null`; closed when dropped).
pub fn spare_fds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|_| OwnedFd::from(std::fs::File::open("/dev/null").expect("open /dev/null"))).collect()
}

/// Send `bytes` with the descriptors `fds`, split into `groups` `SCM_RIGHTS` control
/// messages of one `sendmsg` (the kernel takes at most 253 per message). Returns the bytes
/// sent.
pub fn send_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd], groups: usize) -> std::io::Result<usize> {
    let groups = groups.max(1);
    let per = fds.len().div_ceil(groups);
    let chunks: Vec<&[RawFd]> = fds.chunks(per.max(1)).collect();
    // SAFETY: CMSG_SPACE is a pure computation.
    let total: usize =
        chunks.iter().map(|c| unsafe { libc::CMSG_SPACE(std::mem::size_of_val(*c) as u32) } as usize).sum();
    let mut space = vec![0u64; total.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: zeroed msghdr is valid; the pointers set below outlive the call.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = space.as_mut_ptr().cast();
    mh.msg_controllen = total as _;
    // SAFETY: `space` has room for every control message (CMSG_SPACE each); CMSG_FIRSTHDR and
    // CMSG_NXTHDR walk inside it, and each message's data gets exactly its descriptors.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        for chunk in &chunks {
            assert!(!c.is_null(), "control buffer too small");
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(*chunk) as u32) as _;
            std::ptr::copy_nonoverlapping(chunk.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), chunk.len());
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    // SAFETY: a valid socket and a message built above.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Read one frame (kind, body) from a blocking stream; `None` at EOF or error.
pub fn read_frame(s: &mut UnixStream) -> Option<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut f = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut f).ok()?;
    let body = f.split_off(1);
    Some((*f.first()?, body))
}

/// A socket-transport WELCOME (this build's protocol, no descriptors) from broker slot 0.
pub fn socket_welcome() -> Vec<u8> {
    let mut b = protocol_version().to_le_bytes().to_vec();
    b.extend_from_slice(&1u32.to_le_bytes()); // flavor: socket
    b.extend_from_slice(&0u32.to_le_bytes()); // broker slot
    b.extend_from_slice(&1u64.to_le_bytes()); // epoch
    b.extend_from_slice(&0x5eed_u64.to_le_bytes()); // broker id
    b.extend_from_slice(&0u32.to_le_bytes()); // descriptors
    frame(KIND_WELCOME, &b)
}

/// The test plays the broker of a socket deployment at `sock`: it welcomes the first worker
/// that connects and hands back the stream (for writing) on the returned channel. Later
/// connections are accepted and held open, unanswered, until the listener thread ends with
/// the test process.
pub fn fake_broker(sock: &Path) -> mpsc::Receiver<UnixStream> {
    fake_broker_with(sock, |_| {})
}

/// [`fake_broker`], running `before_welcome` on the first connection between the HELLO and
/// the WELCOME.
pub fn fake_broker_with(
    sock: &Path,
    before_welcome: impl FnOnce(&UnixStream) + Send + 'static,
) -> mpsc::Receiver<UnixStream> {
    let mut before_welcome = Some(before_welcome);
    let listener = UnixListener::bind(sock).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        let mut first = true;
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            if first {
                let (k, _) = read_frame(&mut s).expect("a HELLO");
                assert_eq!(k, KIND_HELLO);
                if let Some(f) = before_welcome.take() {
                    f(&s);
                }
                let _ = s.write_all(&socket_welcome());
                let _ = tx.send(s.try_clone().unwrap());
                first = false;
            }
            held.push(s);
        }
    });
    rx
}

/// Whether the peer closes `s` within `limit` (a read returns 0 or a reset); bytes it sends
/// meanwhile are skipped.
pub fn closed_within(s: &mut UnixStream, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    let mut b = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}
