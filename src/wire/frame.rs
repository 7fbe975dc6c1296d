//! Length-prefixed framing for the control channel, robust to partial reads and writes.
//!
//! A frame is `len: u32 LE` (bytes that follow), `kind: u8`, then `len - 1` body bytes.
//! The reader keeps whatever part of a frame has arrived and resumes exactly there on the
//! next read, so a read that stops in the middle of a frame (a timeout, a signal, a slow
//! peer) never desynchronizes the stream, unlike the model library. A frame longer than the
//! configured limit, or empty, is a protocol error: the connection is dropped, nothing else.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use crate::sys;

/// Frame kinds.
pub(crate) mod kind {
    /// client -> broker: attach request.
    pub const HELLO: u8 = 1;
    /// broker -> client: attach accepted; the region memfd and the eventfds ride with it.
    pub const WELCOME: u8 = 2;
    /// broker -> client: attach refused; body is a UTF-8 reason.
    pub const REJECT: u8 = 3;
    /// client -> broker: a unique event: `id u64, hash_len u16, hash, message`.
    pub const UNIQUE: u8 = 4;
    /// broker -> client: unique events up to `id u64` are handled (delivered or deduped).
    pub const UNIQUE_ACK: u8 = 5;
    /// client -> broker (socket transport): an "all" event; body is the message.
    pub const EVENT: u8 = 6;
    /// broker -> client (socket transport): an event for this worker; body is the message.
    pub const DELIVER: u8 = 7;
    /// broker -> client (socket transport): `count u64` events of publisher `origin u32`
    /// were dropped on the way to this worker: `origin u32, count u64`.
    pub const LOST: u8 = 8;
    /// inspector -> broker: a read-only snapshot request (`protocol u32`); takes no slot.
    pub const INSPECT: u8 = 9;
    /// broker -> inspector: the snapshot's broker view (and the region memfd on shared
    /// memory), see `control/protocol.rs`.
    pub const INSPECT_REPLY: u8 = 10;
    /// agent -> broker, then broker -> every client: the privileged agent's unique-diversion
    /// patterns (`divert.rs`), replacing the previous list (an empty list: divert nothing).
    pub const DIVERT: u8 = 11;
    /// client -> broker (socket transport): `total u64`, the data frames (`DELIVER`, `LOST`)
    /// of this connection the worker has dispatched so far (callbacks run, not merely
    /// read); queued at the end of a dispatch pass when one is owed and the pass delivered
    /// nothing, or data goes out anyway, or 64 frames are owed (`socket/ack.rs`). The broker
    /// reports what a dead worker was sent and never acknowledged to the slot's next holder.
    pub const ACK: u8 = 12;
}

/// Bytes one [`FrameReader::fill`] call takes at most.
pub(crate) const FILL_LIMIT: usize = 1 << 20;

/// Incoming bytes of one connection, cut into frames. Invariant: `start <= end <=
/// buf.len()`; `buf[start..end]` holds the bytes received and not yet returned as frames;
/// `buf[end..]` is initialized spare room (never zeroed again after it was first grown).
#[derive(Debug)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
}

/// Bytes asked of the kernel per `recv`.
const READ_CHUNK: usize = 64 * 1024;

/// What a read from the socket found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadState {
    /// Some bytes (maybe zero) arrived; the peer is still there.
    Open,
    /// The peer closed its end.
    Closed,
}

impl FrameReader {
    pub(crate) fn new(max_frame: usize) -> Self {
        FrameReader { buf: Vec::new(), start: 0, end: 0, max_frame }
    }

    /// Read what is available now (non-blocking): at most `limit` bytes (and at most
    /// [`FILL_LIMIT`]) per call, so one busy peer cannot hold the caller and a broker can
    /// hold a publisher back (epoll is level-triggered: the rest is reported again).
    ///
    /// Descriptors: with `fds`, those passed with the bytes are collected there; without, the
    /// peer must pass none: any it passes is closed at once and the read fails
    /// (`InvalidData`), as does a truncated control message (`MSG_CTRUNC`, every descriptor
    /// of it closed), so no descriptor a peer sends outlives the call unless asked for.
    pub(crate) fn fill(
        &mut self,
        sock: BorrowedFd<'_>,
        mut fds: Option<&mut Vec<OwnedFd>>,
        limit: usize,
    ) -> io::Result<ReadState> {
        let limit = limit.min(FILL_LIMIT);
        let mut taken = 0;
        loop {
            if taken >= limit {
                return Ok(ReadState::Open);
            }
            self.make_room();
            let want = (limit - taken).min(self.buf.len() - self.end);
            let r = sys::recv_with_fds(sock, &mut self.buf[self.end..self.end + want], fds.as_deref_mut());
            match r {
                Ok(0) => return Ok(ReadState::Closed),
                Ok(n) => {
                    self.end += n;
                    taken += n;
                    if n < want {
                        // A short read: the socket is drained (what arrives meanwhile is
                        // read next time; epoll is level-triggered). Saves the EAGAIN call.
                        return Ok(ReadState::Open);
                    }
                }
                Err(e) => {
                    return match e.kind() {
                        io::ErrorKind::WouldBlock => Ok(ReadState::Open),
                        io::ErrorKind::Interrupted => continue,
                        _ => Err(e),
                    };
                }
            }
        }
    }

    /// Change the frame length limit (a connection is held to a small one until it attaches).
    pub(crate) fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Ensure [`READ_CHUNK`] bytes of room after `end`: reuse the space of the frames
    /// already returned (so a peer whose reads always end inside a frame cannot make us keep
    /// every byte it ever sent), grow only when the unread bytes need it.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && (self.start >= READ_CHUNK || self.buf.len() - self.end < READ_CHUNK) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < READ_CHUNK {
            self.buf.resize(self.end + READ_CHUNK, 0);
        }
    }

    /// Feed bytes directly (tests and fuzzing).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.make_room();
        self.buf.truncate(self.end);
        self.buf.extend_from_slice(bytes);
        self.end = self.buf.len();
    }

    /// The next complete frame, if one has arrived: `(kind, body)`.
    pub(crate) fn next_frame(&mut self) -> Result<Option<(u8, &[u8])>, String> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > self.max_frame {
            return Err(format!("frame length {len} outside 1..={}", self.max_frame));
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let frame = &self.buf[self.start + 4..self.start + 4 + len];
        self.start += 4 + len;
        Ok(Some((frame[0], &frame[1..])))
    }
}

/// Outgoing bytes of one connection; descriptors ride with the first byte of the frame they
/// were queued with.
#[derive(Debug, Default)]
pub(crate) struct FrameWriter {
    buf: Vec<u8>,
    sent: usize,
    /// `(offset in buf, fds)`: sent with the sendmsg whose data starts at that offset.
    fds: Vec<(usize, Vec<RawFd>)>,
}

impl FrameWriter {
    /// Queue one frame.
    pub(crate) fn frame(&mut self, kind: u8, body: &[&[u8]]) {
        let len: usize = 1 + body.iter().map(|b| b.len()).sum::<usize>();
        self.buf.extend_from_slice(&(len as u32).to_le_bytes());
        self.buf.push(kind);
        for b in body {
            self.buf.extend_from_slice(b);
        }
    }

    /// Queue one frame carrying descriptors. The descriptors must stay open until
    /// [`FrameWriter::flush`] reports the frame sent.
    pub(crate) fn frame_with_fds(&mut self, kind: u8, body: &[&[u8]], fds: Vec<RawFd>) {
        self.fds.push((self.buf.len(), fds));
        self.frame(kind, body);
    }

    /// Bytes queued and not yet written.
    pub(crate) fn pending(&self) -> bool {
        self.sent < self.buf.len()
    }

    /// Write as much as the socket takes now. `Ok(true)` when everything went out.
    pub(crate) fn flush(&mut self, sock: BorrowedFd<'_>) -> io::Result<bool> {
        while self.sent < self.buf.len() {
            // Stop each write at the next frame that carries descriptors, and attach them
            // when that frame starts the write.
            let mut end = self.buf.len();
            let mut fds: &[RawFd] = &[];
            for (off, f) in &self.fds {
                if *off == self.sent {
                    fds = f;
                } else if *off > self.sent {
                    end = end.min(*off);
                    break;
                }
            }
            let r = if fds.is_empty() {
                sys::send(sock, &self.buf[self.sent..end])
            } else {
                sys::send_with_fds(sock, &self.buf[self.sent..end], fds)
            };
            match r {
                Ok(n) => {
                    if !fds.is_empty() {
                        let at = self.sent;
                        self.fds.retain(|(off, _)| *off != at);
                    }
                    self.sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        self.sent = 0;
        Ok(true)
    }
}

/// Little-endian cursor over a frame body; every read is bounds-checked.
pub(crate) struct Body<'a>(pub &'a [u8]);

impl<'a> Body<'a> {
    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        let (h, t) = self.0.split_at_checked(4).ok_or("truncated frame body")?;
        self.0 = t;
        Ok(u32::from_le_bytes(h.try_into().expect("4 bytes")))
    }
    pub(crate) fn u16(&mut self) -> Result<u16, String> {
        let (h, t) = self.0.split_at_checked(2).ok_or("truncated frame body")?;
        self.0 = t;
        Ok(u16::from_le_bytes(h.try_into().expect("2 bytes")))
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let (h, t) = self.0.split_at_checked(n).ok_or("truncated frame body")?;
        self.0 = t;
        Ok(h)
    }
    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        let (h, t) = self.0.split_at_checked(8).ok_or("truncated frame body")?;
        self.0 = t;
        Ok(u64::from_le_bytes(h.try_into().expect("8 bytes")))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split() {
        let mut w = FrameWriter::default();
        w.frame(kind::HELLO, &[b"abc"]);
        w.frame(kind::REJECT, &[b"", b"no"]);
        w.frame(7, &[&[9u8; 300]]);
        let bytes = w.buf.clone();
        for cut in 0..bytes.len() {
            let mut r = FrameReader::new(1024);
            r.push(&bytes[..cut]);
            let mut got = Vec::new();
            while let Some((k, b)) = r.next_frame().unwrap() {
                got.push((k, b.to_vec()));
            }
            r.push(&bytes[cut..]);
            while let Some((k, b)) = r.next_frame().unwrap() {
                got.push((k, b.to_vec()));
            }
            assert_eq!(got, vec![(kind::HELLO, b"abc".to_vec()), (kind::REJECT, b"no".to_vec()), (7, vec![9u8; 300])]);
        }
    }

    #[test]
    fn a_peer_always_mid_frame_does_not_grow_the_buffer() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut r = FrameReader::new(1024);
        let frame = [5u8, 0, 0, 0, 7, 1, 2, 3, 4];
        use std::io::Write;
        (&a).write_all(&frame[..4]).unwrap();
        let mut fds = Vec::new();
        for _ in 0..40_000 {
            // The rest of a frame and the start of the next one.
            (&a).write_all(&frame[4..]).unwrap();
            (&a).write_all(&frame[..4]).unwrap();
            r.fill(std::os::fd::AsFd::as_fd(&b), Some(&mut fds), usize::MAX).unwrap();
            while let Some((k, body)) = r.next_frame().unwrap() {
                assert_eq!((k, body), (7, &[1u8, 2, 3, 4][..]));
            }
        }
        // 360,000 bytes went through; without compaction the reader would hold them all.
        assert!(r.buf.len() < 200_000, "the reader kept {} bytes", r.buf.len());
    }

    #[test]
    fn oversize_and_empty_frames_are_errors() {
        let mut r = FrameReader::new(16);
        r.push(&17u32.to_le_bytes());
        assert!(r.next_frame().is_err());
        let mut r = FrameReader::new(16);
        r.push(&0u32.to_le_bytes());
        assert!(r.next_frame().is_err());
    }

    #[test]
    fn body_reads_are_bounds_checked() {
        let mut b = Body(&[1, 0, 0, 0, 2]);
        assert_eq!(b.u32().unwrap(), 1);
        assert!(b.u32().is_err());
        assert!(Body(&[0; 7]).u64().is_err());
    }
}
