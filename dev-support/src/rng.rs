//! A seeded, reproducible generator.

/// xorshift64 (shifts 13, 7, 17): small, fast, and deterministic for a given seed, so a test
/// that prints its seed can be replayed. Not for anything that needs real randomness.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
    seed: u64,
}

/// Stands in for the seed 0, on which xorshift would stay at 0 forever.
const ZERO_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    /// A generator seeded with `seed` (0 is replaced by a fixed non-zero constant).
    pub fn new(seed: u64) -> Rng {
        let state = if seed == 0 { ZERO_SEED } else { seed };
        Rng { state, seed }
    }

    /// A generator seeded from the monotonic clock: different in every run. Print
    /// [`seed`](Rng::seed) to make a failure replayable.
    pub fn from_clock() -> Rng {
        Rng::new(crate::monotonic_ns() | 1)
    }

    /// Seeded from the environment variable `var` if it is set to a number (to replay a run),
    /// else from the clock as [`from_clock`](Rng::from_clock).
    pub fn from_env_or_clock(var: &str) -> Rng {
        Rng::from_seed_text(std::env::var(var).ok().as_deref())
    }

    fn from_seed_text(text: Option<&str>) -> Rng {
        match text.and_then(|s| s.trim().parse().ok()) {
            Some(seed) => Rng::new(seed),
            None => Rng::from_clock(),
        }
    }

    /// The seed this generator started from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// A number in `0..n` (`next_u64() % n`: the modulo bias is irrelevant for small `n`).
    ///
    /// # Panics
    /// If `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }

    /// `true` with probability about `1 / n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// Fill `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        let va: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let vb: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(va, vb);
        assert_eq!(a.seed(), 42);
        let mut c = Rng::new(43);
        assert_ne!(va[..4], (0..4).map(|_| c.next_u64()).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn matches_the_xorshift64_reference() {
        // x ^= x << 13; x ^= x >> 7; x ^= x << 17 from x = 1, computed by hand:
        // 1 -> 0x2001 -> 0x2001 ^ 0x40 = 0x2041 -> 0x2041 ^ (0x2041 << 17) = 0x4082_2041.
        assert_eq!(Rng::new(1).next_u64(), 0x4082_2041);
    }

    #[test]
    fn zero_seed_does_not_stick_at_zero() {
        let mut r = Rng::new(0);
        assert_eq!(r.seed(), 0);
        assert!((0..10).map(|_| r.next_u64()).all(|v| v != 0));
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = Rng::new(7);
        let mut seen = [0u32; 5];
        for _ in 0..1000 {
            seen[r.below(5) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 100), "{seen:?}");
        assert!((0..1000).all(|_| r.below(1) == 0));
    }

    #[test]
    fn fill_writes_every_byte() {
        let mut buf = [0u8; 21];
        Rng::new(3).fill(&mut buf);
        let mut r = Rng::new(3);
        let want: Vec<u8> = (0..3).flat_map(|_| r.next_u64().to_le_bytes()).take(21).collect();
        assert_eq!(buf[..], want[..]);
        assert_ne!(buf[16..], [0u8; 5], "the partial last chunk is written too");
    }

    #[test]
    fn seeded_from_the_environment_or_the_clock() {
        assert_eq!(Rng::from_seed_text(Some(" 1234\n")).seed(), 1234);
        assert_eq!(Rng::from_seed_text(Some("nope")).seed() & 1, 1, "clock seeds are odd, never 0");
        let r = Rng::from_env_or_clock("WE_DEV_SUPPORT_TEST_SEED_UNSET");
        assert_eq!(r.seed() & 1, 1, "clock seeds are odd, never 0");
    }
}
