//! A raw control-socket client: a HELLO (or any bytes) written by hand, and the broker's
//! first answer. In this process ([`raw_exchange`]) or as a child of another uid
//! ([`client_main`], spawned with [`Spawn::raw`]): it is not a worker, so it has a role of its
//! own, which runs once and exits.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use worker_events::Wid;

use super::cfg::{Cfg, Spawn};
use super::role::{die, out};

/// Control-frame kinds (the first byte after the length; see [`hello_frame`]).
pub const KIND_HELLO: u8 = 1;
/// Attach accepted.
pub const KIND_WELCOME: u8 = 2;
/// Attach refused; the body is a UTF-8 reason.
pub const KIND_REJECT: u8 = 3;

/// The fields of a HELLO, the first frame a worker sends on the control socket.
#[derive(Debug, Clone, Copy)]
pub struct Hello {
    /// Control protocol version (this build speaks 2).
    pub protocol: u32,
    /// Shared-memory layout version (this build uses 3).
    pub layout: u32,
    pub slot: u32,
    pub pid: u32,
    /// The geometry, which must equal the broker's options: `workers`, privileged agent
    /// (0/1), `ring_capacity` in bytes.
    pub workers: u32,
    pub agent: u32,
    pub ring_capacity: u32,
}

impl Hello {
    /// A well-formed HELLO for `slot` of the deployment `cfg` describes.
    pub fn for_cfg(cfg: &Cfg, slot: u32) -> Hello {
        Hello {
            protocol: 2,
            layout: 3,
            slot,
            pid: std::process::id(),
            workers: cfg.workers,
            agent: u32::from(cfg.agent),
            ring_capacity: cfg.options().get_ring_capacity() as u32,
        }
    }
}

/// The bytes of a HELLO frame. Every control frame is `len: u32 LE` (the bytes that follow),
/// `kind: u8`, then `len - 1` body bytes. A HELLO's body is seven `u32 LE`: protocol
/// version, layout version, slot, pid, workers, privileged agent (0/1), ring_capacity. The
/// broker answers WELCOME (kind 2; on shared memory the region and eventfds ride with it) or
/// REJECT (kind 3, body = the reason in UTF-8), and closes the connection after a REJECT.
pub fn hello_frame(h: &Hello) -> Vec<u8> {
    let fields = [h.protocol, h.layout, h.slot, h.pid, h.workers, h.agent, h.ring_capacity];
    let mut v = ((1 + 4 * fields.len()) as u32).to_le_bytes().to_vec();
    v.push(KIND_HELLO);
    for f in fields {
        v.extend_from_slice(&f.to_le_bytes());
    }
    v
}

/// The broker's answer on a raw connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// One frame: (kind, body as text).
    Frame(u8, String),
    /// The broker closed the connection without a (complete) frame.
    Closed,
}

fn closed(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset)
}

/// Read the first frame the peer sends on `s` (at most 10 s).
pub fn read_reply(s: &mut std::os::unix::net::UnixStream) -> Reply {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if closed(&e) => return Reply::Closed,
        Err(e) => panic!("no reply from the broker within 10 s: {e}"),
    }
    let mut frame = vec![0u8; u32::from_le_bytes(len) as usize];
    match s.read_exact(&mut frame) {
        Ok(()) if !frame.is_empty() => Reply::Frame(frame[0], String::from_utf8_lossy(&frame[1..]).into_owned()),
        Ok(()) => Reply::Closed,
        Err(e) if closed(&e) => Reply::Closed,
        Err(e) => panic!("truncated reply from the broker: {e}"),
    }
}

/// Connect to the control socket at `path`, send `bytes`, return the first reply.
pub fn raw_exchange(path: &Path, bytes: &[u8]) -> Reply {
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect to the control socket");
    s.write_all(bytes).expect("write to the control socket");
    read_reply(&mut s)
}

impl Spawn {
    /// The raw-client role: send `frame`, as `uid` (and gid) if given.
    pub fn raw(frame: &[u8], uid: Option<u32>) -> Spawn {
        Spawn {
            raw_frame: Some(frame.iter().map(|b| format!("{b:02x}")).collect()),
            raw_uid: uid,
            ..Spawn::worker(Wid::Worker(0))
        }
    }
}

/// The raw-client role: optionally switch to another user first (setgroups, setgid, then
/// setuid; needs root), connect to the control socket, send the bytes (hex in `frame`), and
/// answer `@@REPLY <kind> <body>` (the reason of a REJECT, the size of another frame) or
/// `@@CLOSED` for the first frame the broker sends, then `@@OK`, and exit.
pub fn client_main(cfg: &Cfg, frame: &str, uid: Option<u32>) -> ! {
    let bytes: Vec<u8> = (0..frame.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&frame[i..i + 2], 16).unwrap_or_else(|e| die(&format!("frame hex: {e}"))))
        .collect();
    if let Some(uid) = uid {
        // SAFETY: plain syscalls on this process's credentials; no pointers but a null
        // group list of length 0. Groups, then group, then user (after setuid the others
        // would be refused).
        let ok =
            unsafe { libc::setgroups(0, std::ptr::null()) == 0 && libc::setgid(uid) == 0 && libc::setuid(uid) == 0 };
        // SAFETY: plain syscalls with no arguments.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if !ok || euid != uid || egid != uid {
            die(&format!("cannot switch to uid {uid}: {} (euid {euid})", std::io::Error::last_os_error()));
        }
    }
    let mut s = std::os::unix::net::UnixStream::connect(&cfg.sock)
        .unwrap_or_else(|e| die(&format!("connect {}: {e}", cfg.sock.display())));
    // A broker that refuses at accept (a foreign uid) may answer and close before our bytes
    // are written: a failing write is fine, the answer is already in our receive queue.
    if let Err(e) = s.write_all(&bytes) {
        eprintln!("raw client: write: {e}");
    }
    match read_reply(&mut s) {
        Reply::Frame(KIND_REJECT, reason) => out(&format!("@@REPLY {KIND_REJECT} {reason}")),
        Reply::Frame(k, body) => out(&format!("@@REPLY {k} ({} bytes)", body.len())),
        Reply::Closed => out("@@CLOSED"),
    }
    out("@@OK");
    std::process::exit(0);
}
