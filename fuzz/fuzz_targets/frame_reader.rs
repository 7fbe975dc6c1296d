//! Control-channel frame reader: an arbitrary byte stream from a peer, delivered through a
//! real unix socket in arbitrarily sized pieces. The reader must never panic and must cut
//! exactly the frames (or the error) that a one-shot parse of the whole stream finds,
//! however the stream was split.
#![no_main]

use std::io::{ErrorKind, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use worker_events::fuzz_api::FrameReader;

/// At most this many pieces: every `fill` zeroes a 64 KiB read buffer, so thousands of
/// pieces would only slow the fuzzer down.
const MAX_PIECES: usize = 64;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Frame limit of the reader (0 refuses every frame).
    max_frame: u32,
    /// Sizes of the pieces the stream is written in; the rest goes in a last piece.
    pieces: Vec<u16>,
    stream: Vec<u8>,
}

/// One-shot reference parse: the frames, and whether a bad length prefix ends the stream.
fn reference(stream: &[u8], max_frame: usize) -> (Vec<(u8, Vec<u8>)>, bool) {
    let mut frames = Vec::new();
    let mut rest = stream;
    while rest.len() >= 4 {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        if len == 0 || len > max_frame {
            return (frames, true);
        }
        if rest.len() - 4 < len {
            break;
        }
        frames.push((rest[4], rest[5..4 + len].to_vec()));
        rest = &rest[4 + len..];
    }
    (frames, false)
}

struct Run {
    reader: FrameReader,
    rd: UnixStream,
    got: Vec<(u8, Vec<u8>)>,
    error: bool,
}

impl Run {
    /// Read what the socket has and cut frames; false once the reader reported an error.
    fn pump(&mut self) -> bool {
        let mut fds = Vec::new();
        let open = self.reader.fill(self.rd.as_fd(), &mut fds).expect("socket read failed");
        assert!(open, "peer reported closed while its end is open");
        assert!(fds.is_empty(), "descriptors out of nowhere");
        self.cut()
    }

    fn cut(&mut self) -> bool {
        loop {
            match self.reader.next_frame() {
                Ok(Some((kind, body))) => self.got.push((kind, body.to_vec())),
                Ok(None) => return true,
                Err(_) => {
                    self.error = true;
                    return false;
                }
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let max_frame = input.max_frame as usize;
    let (want, want_error) = reference(&input.stream, max_frame);

    let (mut wr, rd) = UnixStream::pair().expect("socketpair");
    wr.set_nonblocking(true).expect("nonblocking");
    rd.set_nonblocking(true).expect("nonblocking");
    let mut run = Run { reader: FrameReader::new(max_frame), rd, got: Vec::new(), error: false };

    let mut rest = &input.stream[..];
    let mut pieces = input.pieces.iter().take(MAX_PIECES - 1).map(|&n| n as usize).chain([usize::MAX]);
    'stream: while !rest.is_empty() {
        let n = pieces.next().unwrap_or(usize::MAX).min(rest.len());
        let mut piece = &rest[..n];
        rest = &rest[n..];
        while !piece.is_empty() {
            match wr.write(piece) {
                Ok(w) => piece = &piece[w..],
                // The socket buffer is full: let the reader drain it.
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("socket write failed: {e}"),
            }
            if !run.pump() {
                break 'stream;
            }
        }
    }
    if !run.error {
        // The peer closes: the reader must say so, and cut nothing new from nothing.
        drop(wr);
        let mut fds = Vec::new();
        let open = run.reader.fill(run.rd.as_fd(), &mut fds).expect("socket read failed");
        assert!(!open, "closed peer not reported");
        run.cut();
    }

    assert_eq!(run.got, want, "frames differ from the one-shot parse");
    assert_eq!(run.error, want_error, "error differs from the one-shot parse");
});
