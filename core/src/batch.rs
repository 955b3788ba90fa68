//! Block copies and their validation. A backend only ever sees a
//! [`ValidatedBatch`]: every block in bounds, no target written twice, and
//! (within one region) no block both read and written, so copies of one batch
//! may run in any order or in parallel.
#![allow(
    clippy::cast_possible_truncation,
    reason = "block indices are u32 by construction"
)]

use crate::error::{Error, Result};
use crate::ids::BlockId;
use crate::storage::Slots;

/// Copy block `src` of a source region to block `dst` of a target region.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlockCopy {
    /// Block read.
    pub src: BlockId,
    /// Block written.
    pub dst: BlockId,
}

/// A batch that passed [`BatchValidator::validate`]. Only the core can make one.
#[derive(Clone, Copy, Debug)]
pub struct ValidatedBatch<'c> {
    copies: &'c [BlockCopy],
    src_blocks: u32,
    dst_blocks: u32,
    same_region: bool,
}

impl<'c> ValidatedBatch<'c> {
    /// The copies, in the order given.
    #[inline]
    pub fn copies(&self) -> &'c [BlockCopy] {
        self.copies
    }
    /// Blocks in the source region.
    #[inline]
    pub fn src_blocks(&self) -> u32 {
        self.src_blocks
    }
    /// Blocks in the target region.
    #[inline]
    pub fn dst_blocks(&self) -> u32 {
        self.dst_blocks
    }
    /// Whether source and target are the same region.
    #[inline]
    pub fn same_region(&self) -> bool {
        self.same_region
    }
}

/// Validates batches in O(batch) with a scratch bitset of caller storage
/// (cleared again after each batch, so its size costs nothing per call).
#[derive(Debug)]
pub struct BatchValidator<'a> {
    bits: Slots<'a, u64>,
    max_blocks: u32,
}

/// Scratch words a validator for regions of up to `max_blocks` blocks needs.
pub const fn validator_words(max_blocks: u32) -> usize {
    2 * (max_blocks as usize).div_ceil(64)
}

impl<'a> BatchValidator<'a> {
    /// A validator for regions of up to `max_blocks` blocks; `bits` must hold
    /// [`validator_words`]`(max_blocks)` words.
    pub fn new(max_blocks: u32, bits: impl Into<Slots<'a, u64>>) -> Result<Self> {
        let mut bits = bits.into();
        let needed = validator_words(max_blocks);
        if bits.len() < needed {
            return Err(Error::StorageTooSmall {
                needed,
                provided: bits.len(),
            });
        }
        bits.fill(0);
        Ok(Self { bits, max_blocks })
    }

    /// A validator with owned scratch.
    #[cfg(feature = "alloc")]
    pub fn with_capacity(max_blocks: u32) -> Self {
        Self {
            bits: Slots::owned(validator_words(max_blocks), 0),
            max_blocks,
        }
    }

    /// A validator with owned scratch, or [`Error::AllocationFailed`].
    #[cfg(feature = "alloc")]
    pub fn try_with_capacity(max_blocks: u32) -> Result<Self> {
        Ok(Self {
            bits: Slots::try_owned(validator_words(max_blocks), 0)?,
            max_blocks,
        })
    }

    /// The word of bit `b` of bit set `set` (0: targets, 1: sources).
    #[inline]
    fn word(&self, set: usize, b: u32) -> usize {
        set * (self.max_blocks as usize).div_ceil(64) + (b / 64) as usize
    }

    #[inline]
    fn test_set(&mut self, set: usize, b: u32) -> bool {
        let i = self.word(set, b);
        let Some(w) = self.bits.get_mut(i) else {
            return true;
        };
        let m = 1u64 << (b % 64);
        let was = *w & m != 0;
        *w |= m;
        was
    }

    #[inline]
    fn test(&self, set: usize, b: u32) -> bool {
        let i = self.word(set, b);
        self.bits.get(i).is_none_or(|w| w & (1u64 << (b % 64)) != 0)
    }

    fn clear(&mut self, copies: &[BlockCopy]) {
        for c in copies {
            for (set, b) in [(0, c.dst.0), (1, c.src.0)] {
                if b < self.max_blocks {
                    let i = self.word(set, b);
                    if let Some(w) = self.bits.get_mut(i) {
                        *w = 0;
                    }
                }
            }
        }
    }

    /// Checks a batch from a region of `src_blocks` blocks to one of
    /// `dst_blocks` (`same_region` when they are one region).
    pub fn validate<'c>(
        &mut self,
        copies: &'c [BlockCopy],
        src_blocks: u32,
        dst_blocks: u32,
        same_region: bool,
    ) -> Result<ValidatedBatch<'c>> {
        if src_blocks > self.max_blocks || dst_blocks > self.max_blocks {
            return Err(Error::CapacityTooLarge {
                requested: u64::from(src_blocks.max(dst_blocks)),
                max: self.max_blocks,
            });
        }
        let mut result = Ok(());
        for (k, c) in copies.iter().enumerate() {
            if c.src.0 >= src_blocks || c.dst.0 >= dst_blocks {
                result = Err(Error::CopyOutOfBounds { copy: k });
                break;
            }
            if self.test_set(0, c.dst.0) {
                result = Err(Error::DuplicateTarget { copy: k });
                break;
            }
            self.test_set(1, c.src.0);
        }
        if result.is_ok() && same_region {
            for (k, c) in copies.iter().enumerate() {
                if self.test(1, c.dst.0) || self.test(0, c.src.0) {
                    result = Err(Error::ReadWriteOverlap { copy: k });
                    break;
                }
            }
        }
        self.clear(copies);
        result.map(|()| ValidatedBatch {
            copies,
            src_blocks,
            dst_blocks,
            same_region,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: u32, d: u32) -> BlockCopy {
        BlockCopy {
            src: BlockId(s),
            dst: BlockId(d),
        }
    }

    #[test]
    fn rejects_bad_batches_and_stays_clean() {
        let mut words = [0u64; validator_words(128)];
        let mut v = BatchValidator::new(128, &mut words).unwrap();
        assert!(v.validate(&[c(0, 1), c(0, 2)], 128, 128, true).is_ok());
        assert_eq!(
            v.validate(&[c(0, 1), c(3, 1)], 128, 128, false)
                .unwrap_err(),
            Error::DuplicateTarget { copy: 1 }
        );
        assert_eq!(
            v.validate(&[c(0, 1), c(1, 2)], 128, 128, true).unwrap_err(),
            Error::ReadWriteOverlap { copy: 0 }
        );
        // Across regions, reading and writing the same index is fine.
        assert!(v.validate(&[c(0, 1), c(1, 2)], 128, 128, false).is_ok());
        assert_eq!(
            v.validate(&[c(0, 200)], 128, 128, false).unwrap_err(),
            Error::CopyOutOfBounds { copy: 0 }
        );
        assert!(v.bits.iter().all(|&w| w == 0));
    }
}
