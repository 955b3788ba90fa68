//! Tokens per block as a divisor: a shift and a mask when it is a power of
//! two (every engine's 16, 32, 64...), a division otherwise. The decode path
//! divides token counts by it several times per sequence per step, and a
//! hardware division costs tens of cycles.

use core::num::NonZeroU32;
use core::ops::{Div, Rem};

/// Tokens per block (never zero).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct BlockSize {
    n: NonZeroU32,
    /// `log2(n)` when `n` is a power of two, else `u32::MAX`.
    shift: u32,
}

impl BlockSize {
    pub(crate) fn new(n: NonZeroU32) -> Self {
        let shift = if n.is_power_of_two() {
            n.trailing_zeros()
        } else {
            u32::MAX
        };
        Self { n, shift }
    }

    /// The number of tokens.
    #[inline]
    pub(crate) fn get(self) -> u32 {
        self.n.get()
    }

    /// Blocks that `tokens` tokens fill, the last one possibly partly.
    #[inline]
    pub(crate) fn blocks_for(self, tokens: u64) -> u64 {
        if self.shift < 32 {
            (tokens >> self.shift) + u64::from(tokens & u64::from(self.n.get() - 1) != 0)
        } else {
            tokens.div_ceil(u64::from(self.n.get()))
        }
    }
}

impl Div<BlockSize> for u32 {
    type Output = u32;
    #[inline]
    fn div(self, bs: BlockSize) -> u32 {
        if bs.shift < 32 {
            self >> bs.shift
        } else {
            self / bs.n
        }
    }
}

impl Rem<BlockSize> for u32 {
    type Output = u32;
    #[inline]
    fn rem(self, bs: BlockSize) -> u32 {
        if bs.shift < 32 {
            self & (bs.n.get() - 1)
        } else {
            self % bs.n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_division() {
        for n in [1u32, 2, 3, 7, 16, 64, 100, 512, 1 << 31, u32::MAX] {
            let bs = BlockSize::new(NonZeroU32::new(n).unwrap());
            for x in [
                0u32,
                1,
                2,
                15,
                16,
                17,
                1000,
                n - 1,
                n,
                n.wrapping_add(1),
                u32::MAX,
            ] {
                assert_eq!(x / bs, x / n, "{x} / {n}");
                assert_eq!(x % bs, x % n, "{x} % {n}");
            }
            for t in [0u64, 1, u64::from(n), u64::from(u32::MAX) * 3, u64::MAX] {
                assert_eq!(bs.blocks_for(t), t.div_ceil(u64::from(n)), "{t} / {n}");
            }
        }
    }
}
