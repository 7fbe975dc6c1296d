//! Attaching to a shared region a peer handed over: a memfd of any size, sealed or not,
//! whose bytes (header, slots, rings, dedup table) are arbitrary. `Region::open` must refuse
//! anything that does not match the geometry this process computed, and whatever it
//! accepts must be safe to use: both ends of every ring and the dedup table are then driven
//! over the (possibly corrupt) contents.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use worker_events::fuzz_api::{Geometry, Region};

#[derive(Arbitrary, Debug)]
enum Source {
    /// A fresh memfd of `size` (`None`: the expected size), `seals` (bit 0: shrink, 1: grow,
    /// 2: write, 3: future write, 4: seal), holding `bytes` from offset 0.
    Raw { size: Option<u32>, seals: u8, bytes: Vec<u8> },
    /// A region made by `Region::create` (valid header), then overwritten in places.
    Created { patches: Vec<(u32, Vec<u8>)> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    workers: u8,
    agent: bool,
    unique_capacity: u8,
    source: Source,
    /// Ring traffic after a successful open: (producer slot, consumer slot, body length).
    traffic: Vec<(u8, u8, u16)>,
    hashes: Vec<Vec<u8>>,
}

fn memfd(size: usize, seals: u8, bytes: &[u8]) -> OwnedFd {
    // SAFETY: plain memfd_create with a NUL-terminated name.
    let raw = unsafe { libc::memfd_create(c"fuzz-region".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(raw >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: valid descriptor; the size fits off_t.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }, 0);
    write_at(&fd, 0, &bytes[..bytes.len().min(size)]);
    let mut s = 0;
    for (bit, seal) in
        [libc::F_SEAL_SHRINK, libc::F_SEAL_GROW, libc::F_SEAL_WRITE, libc::F_SEAL_FUTURE_WRITE].into_iter().enumerate()
    {
        if seals & (1 << bit) != 0 {
            s |= seal;
        }
    }
    if seals & 16 != 0 {
        s |= libc::F_SEAL_SEAL;
    }
    // SAFETY: valid descriptor, plain integer argument.
    assert_eq!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, s) }, 0);
    fd
}

fn write_at(fd: &impl AsRawFd, offset: usize, bytes: &[u8]) {
    // SAFETY: `bytes` is valid for bytes.len() reads; the kernel checks the descriptor.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), offset as libc::off_t) };
    assert_eq!(n, bytes.len() as isize, "pwrite: {}", std::io::Error::last_os_error());
}

fuzz_target!(|input: Input| {
    // Small regions (the options validation of the library bounds the real ones): 1..=3
    // workers, the 4 KiB minimum ring, 32..=512 dedup buckets.
    let workers = 1 + u32::from(input.workers % 3);
    let unique_capacity = 1 + usize::from(input.unique_capacity);
    let geo = Geometry::new(workers, input.agent, 4096, unique_capacity);
    let size = geo.region_size();

    let (fd, created) = match &input.source {
        Source::Raw { size: fsize, seals, bytes } => {
            let fsize = fsize.map_or(size, |s| s as usize % (2 * size));
            (memfd(fsize, *seals, bytes), None)
        }
        Source::Created { patches } => {
            let r = Region::create(geo, 1 << 16).expect("creating a region");
            for (off, bytes) in patches {
                let off = *off as usize % size;
                write_at(&r.fd(), off, &bytes[..bytes.len().min(size - off)]);
            }
            let fd = r.fd().try_clone_to_owned().expect("dup");
            (fd, Some(r))
        }
    };
    let (fd_size, sealed) = {
        // SAFETY: zeroed stat is a valid out-parameter; valid descriptor.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        // SAFETY: valid descriptor.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        (st.st_size as usize, seals & want == want)
    };

    let Ok(region) = Region::open(fd, geo) else { return };
    assert_eq!(fd_size, size, "a region of the wrong size was accepted");
    assert!(sealed, "an unsealed region was accepted");
    // The creating broker's mapping (if any) stays alive beside ours, as in real life.
    let _broker = created;

    // Drive every ring end over whatever the rings hold.
    let slots = geo.slots();
    let body = vec![0x5au8; 8192];
    for p in 0..slots {
        for c in 0..slots {
            if let Some(Ok(mut cons)) = region.consumer(p, c) {
                for _ in 0..64 {
                    match cons.peek() {
                        Ok(Some(rec)) => {
                            assert!(rec.len <= 4096 - 8);
                            let got = cons.consume(true).expect("peeked");
                            assert_eq!(got.map(|b| b.len()), Some(rec.len));
                        }
                        Ok(None) => break,
                        Err(_) => {
                            cons.skip_all();
                            break;
                        }
                    }
                }
                cons.release();
                cons.take_lost();
                cons.depth();
            }
        }
    }
    for &(p, c, len) in input.traffic.iter().take(64) {
        let (p, c) = (u32::from(p) % slots, u32::from(c) % slots);
        if let Some(Ok(mut prod)) = region.producer(p, c) {
            let len = (len as usize).min(body.len());
            if prod.try_write(3, &[&body[..len]]).unwrap_or(false) {
                prod.commit();
            }
        }
    }
    for (i, h) in input.hashes.iter().take(64).enumerate() {
        region.dedup_check(h, 1_000 + i as u64, 500);
    }
});
