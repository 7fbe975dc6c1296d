//! Unit tests of `wire/queue.rs`.

use super::*;
use crate::wire::frame::FrameReader;
use std::os::fd::AsFd;

fn pair() -> (std::os::unix::net::UnixStream, std::os::unix::net::UnixStream) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

/// Write everything `q` holds into `a`, reading the frames out of `b` as it goes.
fn drain(
    q: &mut OutQueue,
    a: &std::os::unix::net::UnixStream,
    b: &std::os::unix::net::UnixStream,
) -> Vec<(u8, Vec<u8>)> {
    let mut r = FrameReader::new(2 << 20);
    let mut got = Vec::new();
    while q.pending_bytes() > 0 {
        q.write(a.as_fd()).unwrap();
        got.extend(read_all(&mut r, b));
    }
    got.extend(read_all(&mut r, b));
    got
}

fn read_all(r: &mut FrameReader, sock: &std::os::unix::net::UnixStream) -> Vec<(u8, Vec<u8>)> {
    let mut fds = Vec::new();
    r.fill(sock.as_fd(), Some(&mut fds), usize::MAX).unwrap();
    let mut got = Vec::new();
    while let Some((k, b)) = r.next_frame().unwrap() {
        got.push((k, b.to_vec()));
    }
    got
}

#[test]
fn bounded_in_frames_and_lost_notices_precede_the_next_event() {
    let mut q = OutQueue::new(2, usize::MAX);
    assert!(q.push(7, &[b"a"]));
    assert!(q.push(7, &[b"b"]));
    assert!(!q.push(7, &[b"c"]));
    q.note_lost(3);
    q.note_lost(3);
    q.push_lost_notices(8);
    assert!(q.owes_notices(), "no room yet: the notice stays owed");
    let (a, b) = pair();
    q.write(a.as_fd()).unwrap();
    assert_eq!(q.len(), 0);
    q.push_lost_notices(8);
    assert!(q.push(7, &[b"d"]));
    q.write(a.as_fd()).unwrap();
    let got = read_all(&mut FrameReader::new(1 << 20), &b);
    let mut lost = 3u32.to_le_bytes().to_vec();
    lost.extend_from_slice(&2u64.to_le_bytes());
    assert_eq!(got, vec![(7, b"a".to_vec()), (7, b"b".to_vec()), (8, lost), (7, b"d".to_vec())]);
}

#[test]
fn bounded_in_bytes_too() {
    let mut q = OutQueue::new(usize::MAX, 100);
    assert!(q.push(7, &[&[0u8; 60]]));
    assert!(q.push(7, &[&[0u8; 60]]), "below the bound when pushed: the frame crossing it is taken");
    assert!(q.is_full());
    assert!(!q.push(7, &[b"x"]));
    assert_eq!(q.queued_bytes(), 2 * 65);
    let (a, _b) = pair();
    q.write(a.as_fd()).unwrap();
    assert_eq!(q.written(), 130);
    assert!(!q.is_full());
    assert!(q.push(7, &[b"x"]));
}

#[test]
fn a_frame_cut_by_a_broken_connection_is_resent_whole_and_nothing_twice() {
    // A small send buffer so that a big frame is taken only in part.
    let (a, b) = pair();
    let big = vec![0xabu8; 1 << 20];
    let mut q = OutQueue::new(16, usize::MAX);
    assert!(q.push(7, &[b"first"]));
    assert!(q.push(7, &[&big]));
    assert!(q.push(7, &[b"last"]));
    q.write(a.as_fd()).unwrap();
    assert!(q.mid_frame(), "the socket buffer cannot take 1 MiB at once");
    assert_eq!(q.len(), 2, "the first frame went out whole");
    drop((a, b)); // the connection breaks
    q.rewind();
    let (a, b) = pair();
    let got = drain(&mut q, &a, &b);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], (7, big));
    assert_eq!(got[1], (7, b"last".to_vec()));
    assert_eq!(q.len(), 0);
}

#[test]
fn control_frames_never_land_inside_a_data_frame() {
    let (a, b) = pair();
    let big = vec![1u8; 1 << 20];
    let mut q = OutQueue::new(16, usize::MAX);
    let mut wr = FrameWriter::default();
    assert!(q.push(7, &[&big]));
    let mut r = FrameReader::new(2 << 20);
    let mut got = Vec::new();
    let mut done = flush_conn(&mut wr, Some(&mut q), a.as_fd()).unwrap();
    assert!(!done);
    wr.frame(5, &[b"ack"]); // a control frame queued while the data frame is half out
    assert!(q.push(7, &[b"tail"]));
    while !done {
        got.extend(read_all(&mut r, &b));
        done = flush_conn(&mut wr, Some(&mut q), a.as_fd()).unwrap();
    }
    got.extend(read_all(&mut r, &b));
    // Every frame parsed whole (a control frame inside a data frame would have broken the
    // stream), the data frames in order; the control frame after the big one.
    let kinds: Vec<u8> = got.iter().map(|(k, _)| *k).collect();
    assert_eq!(got.len(), 3, "{kinds:?}");
    assert_eq!(got[0], (7, big));
    let data: Vec<&Vec<u8>> = got.iter().filter(|(k, _)| *k == 7).map(|(_, b)| b).collect();
    assert_eq!(data[1], b"tail");
    assert!(got.contains(&(5, b"ack".to_vec())));
}

#[test]
fn tickets_tell_written_frames_and_taking_frames_out_keeps_them_true() {
    let (a, b) = pair();
    let big = vec![2u8; 1 << 20];
    let mut q = OutQueue::new(16, usize::MAX);
    assert!(q.push(7, &[b"u1"]));
    let t1 = q.ticket();
    assert!(q.push(6, &[&big]));
    assert!(q.push(7, &[b"u2"]));
    let t2 = q.ticket();
    assert!(q.push(6, &[b"all"]));
    q.write(a.as_fd()).unwrap();
    assert!(q.mid_frame(), "the big frame is written in part");
    assert!(q.done() >= t1 && q.done() < t2);
    // The frame written in part stays; u2 (never written) comes out; the rest stays.
    let taken = q.take_unwritten(|k, _| k == 7);
    assert_eq!(taken, vec![b"u2".to_vec()]);
    assert!(q.push(7, &[b"u3"]));
    let t3 = q.ticket();
    let got = drain(&mut q, &a, &b);
    assert!(q.done() >= t3);
    let kinds: Vec<(u8, usize)> = got.iter().map(|(k, b)| (*k, b.len())).collect();
    assert_eq!(kinds, vec![(7, 2), (6, 1 << 20), (6, 3), (7, 2)]);
    assert_eq!(got[3].1, b"u3");
}

#[test]
fn acks_ride_outside_the_bounds_and_the_tail_one_is_rewritten() {
    let mut q = OutQueue::new(2, 1 << 20);
    assert!(q.push(6, &[b"a"]));
    q.push_ack(1);
    q.push_ack(2);
    assert_eq!(q.len(), 1, "acknowledgements are not counted");
    assert!(q.push(6, &[b"b"]));
    assert!(q.is_full());
    q.push_ack(3);
    let (a, b) = pair();
    q.write(a.as_fd()).unwrap();
    assert_eq!(q.len(), 0);
    q.push_ack(4);
    assert_eq!(q.pending_bytes(), 13, "one more ACK frame: the last one is written already");
    q.take_unwritten(|k, _| k == kind::ACK);
    assert_eq!((q.len(), q.pending_bytes()), (0, 0));
    let mut r = FrameReader::new(64);
    r.fill(b.as_fd(), None, usize::MAX).unwrap();
    let mut got = Vec::new();
    while let Some((k, body)) = r.next_frame().unwrap() {
        got.push((k, body.to_vec()));
    }
    let ack = |t: u64| (kind::ACK, t.to_le_bytes().to_vec());
    assert_eq!(got, vec![(6, b"a".to_vec()), ack(2), (6, b"b".to_vec()), ack(3)]);
}

#[test]
fn inbox_bodies_are_aligned_and_in_order() {
    let mut ib = Inbox::default();
    let on = |peer, conn| Link { peer, conn };
    ib.push(on(Peer::Slot(1), 3), 6, b"abc");
    ib.push(on(Peer::Slot(2), 4), 7, &[9u8; 33]);
    ib.push(on(Peer::Broker, 5 + (1 << 32)), 8, b"");
    let mut got = Vec::new();
    let mut conns = Vec::new();
    ib.drain(|from, kind, body| {
        assert_eq!(body.as_ptr() as usize % 16, 0);
        got.push((from.peer, kind, body.to_vec()));
        conns.push(from.conn);
    });
    assert_eq!(conns, vec![3, 4, 5], "each record keeps the low 32 bits of its connection id");
    assert_eq!(
        got,
        vec![(Peer::Slot(1), 6, b"abc".to_vec()), (Peer::Slot(2), 7, vec![9u8; 33]), (Peer::Broker, 8, vec![])]
    );
    assert!(ib.is_empty());
}
