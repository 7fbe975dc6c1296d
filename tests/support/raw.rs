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
    /// Control protocol version (this build's: [`protocol_version`]).
    pub protocol: u32,
    /// Shared-memory layout version (this build's: [`layout_version`]).
    pub layout: u32,
    pub slot: u32,
    pub pid: u32,
    /// The options that must equal the broker's: `workers`, privileged agent (0/1),
    /// `ring_capacity` in bytes, `unique_capacity`, `max_payload_len`, `unique_timeout` in
    /// nanoseconds, the transport (0 Auto, 1 SharedMemory, 2 Socket; Auto accepts the
    /// broker's), and `broadcast_capacity` in bytes (0: none).
    pub workers: u32,
    pub agent: u32,
    pub ring_capacity: u32,
    pub unique_capacity: u32,
    pub max_payload_len: u32,
    pub unique_timeout_ns: u64,
    pub transport: u32,
    pub broadcast_capacity: u32,
}

/// The control protocol version this build speaks, read from the constant in
/// `src/control/protocol.rs`, so a protocol change needs no test edit.
pub fn protocol_version() -> u32 {
    const SRC: &str = include_str!("../../src/control/protocol.rs");
    SRC.lines()
        .find_map(|l| l.trim().strip_prefix("pub(crate) const PROTOCOL_VERSION: u32 = "))
        .and_then(|rest| rest.trim_end_matches(';').trim().parse().ok())
        .expect("src/control/protocol.rs defines PROTOCOL_VERSION")
}

/// The shared-memory layout version this build speaks, read from the constant in
/// `src/layout.rs` (the crate keeps it private), so a layout change needs no test edit.
pub fn layout_version() -> u32 {
    const SRC: &str = include_str!("../../src/layout.rs");
    SRC.lines()
        .find_map(|l| l.trim().strip_prefix("pub(crate) const LAYOUT_VERSION: u32 = "))
        .and_then(|rest| rest.trim_end_matches(';').trim().parse().ok())
        .expect("src/layout.rs defines LAYOUT_VERSION")
}

impl Hello {
    /// A well-formed HELLO for `slot` of the deployment `cfg` describes.
    pub fn for_cfg(cfg: &Cfg, slot: u32) -> Hello {
        let o = cfg.options();
        Hello {
            protocol: protocol_version(),
            layout: layout_version(),
            slot,
            pid: std::process::id(),
            workers: cfg.workers,
            agent: u32::from(cfg.agent),
            ring_capacity: o.get_ring_capacity() as u32,
            unique_capacity: o.get_unique_capacity() as u32,
            max_payload_len: o.get_max_payload_len() as u32,
            unique_timeout_ns: o.get_unique_timeout().as_nanos() as u64,
            transport: 0,
            broadcast_capacity: o.get_broadcast_capacity() as u32,
        }
    }
}

/// The bytes of a HELLO frame. Every control frame is `len: u32 LE` (the bytes that follow),
/// `kind: u8`, then `len - 1` body bytes. A HELLO's body is, little-endian: protocol
/// version, layout version, slot, pid, workers, privileged agent (0/1), ring_capacity,
/// unique_capacity, max_payload_len (each `u32`), unique_timeout in ns (`u64`), transport
/// and broadcast_capacity (`u32`). The
/// broker answers WELCOME (kind 2; on shared memory the region and eventfds ride with it) or
/// REJECT (kind 3, body = the reason in UTF-8), and closes the connection after a REJECT.
pub fn hello_frame(h: &Hello) -> Vec<u8> {
    let fields = [
        h.protocol,
        h.layout,
        h.slot,
        h.pid,
        h.workers,
        h.agent,
        h.ring_capacity,
        h.unique_capacity,
        h.max_payload_len,
    ];
    let mut body: Vec<u8> = fields.iter().flat_map(|f| f.to_le_bytes()).collect();
    body.extend_from_slice(&h.unique_timeout_ns.to_le_bytes());
    body.extend_from_slice(&h.transport.to_le_bytes());
    body.extend_from_slice(&h.broadcast_capacity.to_le_bytes());
    let mut v = ((1 + body.len()) as u32).to_le_bytes().to_vec();
    v.push(KIND_HELLO);
    v.extend_from_slice(&body);
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
