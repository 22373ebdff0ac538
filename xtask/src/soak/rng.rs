//! A small seeded generator (SplitMix64): the soak test's random choices and payloads,
//! reproducible from the seed it prints.

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the bias is negligible for the n used here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A size from 1 to `max`, spread evenly over the powers of two: mostly small, with
    /// some large ones.
    pub fn size(&mut self, max: usize) -> usize {
        let bits = usize::BITS - max.leading_zeros();
        let top = 1usize << self.below(u64::from(bits));
        (top + self.below(top as u64) as usize).clamp(1, max)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes() {
        assert_eq!(Rng::new(7).bytes(33), Rng::new(7).bytes(33));
        assert_ne!(Rng::new(7).bytes(33), Rng::new(8).bytes(33));
        // A prefix of a longer run: the HTTP client checks bodies chunk by chunk.
        assert_eq!(Rng::new(7).bytes(40)[..32], Rng::new(7).bytes(32)[..]);
    }

    #[test]
    fn sizes_stay_in_bounds() {
        let mut r = Rng::new(1);
        for _ in 0..10_000 {
            let s = r.size(1000);
            assert!((1..=1000).contains(&s));
        }
    }
}
