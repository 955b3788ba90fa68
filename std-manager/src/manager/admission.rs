//! Admission to the host tier: which cached blocks about to be evicted from
//! a device are worth copying to host memory.
//!
//! [`HostAdmission::SecondTouch`] admits a block only if its key was asked
//! for by at least two prompts recently, so one-off prompts (most of a
//! serving trace's blocks) do not flood the host tier and push out blocks
//! that are reused. "Recently" is a frequency sketch of fixed size (a
//! count-min sketch of two rows of 4-bit counters, as TinyLFU's): every
//! prompt key touches it once; after as many touches as it has counters,
//! every count is halved, so old popularity fades. It costs half a byte per
//! counter, four counters per block of the device and host pools, allocated
//! once; a test is O(1), a touch O(1) amortized (one touch in as many as
//! there are counters pays the halving pass).

use pagedkv_core::BlockHash;

use crate::types::HostAdmission;

/// Counters per block of the pools the sketch serves.
const COUNTERS_PER_BLOCK: usize = 4;
/// A count saturates here (4 bits).
const MAX_COUNT: u8 = 15;

/// Recent prompt touches of block keys, approximately.
#[derive(Debug)]
pub(super) struct TouchSketch {
    policy: HostAdmission,
    /// Two rows of `mask + 1` counters, two per byte.
    rows: [Vec<u8>; 2],
    mask: usize,
    /// Touches since the last halving.
    touches: usize,
}

impl TouchSketch {
    /// A sketch for pools of `blocks` blocks in all (none for
    /// [`HostAdmission::Every`], which needs no memory).
    pub(super) fn new(policy: HostAdmission, blocks: usize) -> Self {
        let counters = match policy {
            HostAdmission::Every => 0,
            // Pools hold at most 2^30 blocks each: no overflow here.
            HostAdmission::SecondTouch => {
                (blocks.clamp(16, 1 << 34) * COUNTERS_PER_BLOCK).next_power_of_two()
            }
        };
        let bytes = counters.div_ceil(2);
        Self {
            policy,
            rows: [vec![0; bytes], vec![0; bytes]],
            mask: counters.saturating_sub(1),
            touches: 0,
        }
    }

    /// Counter positions of `key` in the two rows (block keys are uniform
    /// hashes already: their two halves index the rows).
    fn slots(&self, key: BlockHash) -> [usize; 2] {
        let lo = key.0 as u64 as usize;
        let hi = (key.0 >> 64) as u64 as usize;
        [lo & self.mask, hi & self.mask]
    }

    fn get(row: &[u8], i: usize) -> u8 {
        row.get(i / 2).map_or(0, |b| (b >> (4 * (i % 2))) & 0xf)
    }

    /// A prompt asked for `key`.
    pub(super) fn touch(&mut self, key: BlockHash) {
        if self.policy == HostAdmission::Every {
            return;
        }
        let slots = self.slots(key);
        for (row, i) in self.rows.iter_mut().zip(slots) {
            if let Some(b) = row.get_mut(i / 2) {
                let shift = 4 * (i % 2);
                let c = (*b >> shift) & 0xf;
                if c < MAX_COUNT {
                    *b += 1 << shift;
                }
            }
        }
        self.touches += 1;
        if self.touches > self.mask {
            self.halve();
        }
    }

    /// Halves every count (old touches fade).
    fn halve(&mut self) {
        for row in &mut self.rows {
            for b in row.iter_mut() {
                *b = (*b >> 1) & 0x77;
            }
        }
        self.touches = 0;
    }

    /// Whether a cached block under `key` may be copied to the host tier.
    pub(super) fn admits(&self, key: BlockHash) -> bool {
        match self.policy {
            HostAdmission::Every => true,
            HostAdmission::SecondTouch => {
                let [a, b] = self.slots(key);
                let [r0, r1] = &self.rows;
                Self::get(r0, a).min(Self::get(r1, b)) >= 2
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> BlockHash {
        let x = u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        BlockHash(x ^ (x >> 61))
    }

    #[test]
    fn second_touch_admits_reused_keys_only() {
        let mut s = TouchSketch::new(HostAdmission::SecondTouch, 1000);
        for i in 0..500 {
            s.touch(key(i));
        }
        for i in 0..100 {
            s.touch(key(i));
        }
        let reused = (0..100).filter(|&i| s.admits(key(i))).count();
        let once = (100..500).filter(|&i| s.admits(key(i))).count();
        assert_eq!(reused, 100, "a key touched twice is admitted");
        // Collisions in both rows at once are rare at this size.
        assert!(once <= 4, "{once} one-off keys admitted");
        assert!(!s.admits(key(10_000)), "never touched");
        let every = TouchSketch::new(HostAdmission::Every, 1000);
        assert!(every.admits(key(10_000)));
        assert!(
            every.rows[0].is_empty(),
            "no memory for admitting everything"
        );
    }

    #[test]
    fn old_touches_fade() {
        let mut s = TouchSketch::new(HostAdmission::SecondTouch, 16);
        s.touch(key(1));
        s.touch(key(1));
        assert!(s.admits(key(1)));
        // Enough touches of another key to halve the counts twice: key 1
        // is down to 0 (the two keys share no counter).
        assert!(
            s.slots(key(3))
                .iter()
                .zip(s.slots(key(1)))
                .all(|(a, b)| *a != b)
        );
        for _ in 0..2 * (s.mask + 1) {
            s.touch(key(3));
        }
        assert!(!s.admits(key(1)));
        assert!(s.admits(key(3)));
        // Counts saturate at 15 without overflowing into the neighbour.
        for _ in 0..40 {
            s.touch(key(2));
        }
        assert!(s.admits(key(2)));
    }
}
