//! Byte layout of KV blocks, and the expansion of block copies into byte ranges.
//!
//! A block holds, for each layer, a key part and a value part, each
//! `kv_heads × tokens_per_block × head_size` elements (the order inside a part
//! is the kernel's business). Two arrangements of a region of `N` blocks:
//!
//! - [`BlockOrder::BlockMajor`]: block `b` is one contiguous run of
//!   `block_bytes` at `b × block_bytes`, its layers inside it. One block copy
//!   is one byte range: best for transfers (swap, offload, moves).
//! - [`BlockOrder::LayerMajor`]: each (layer, K/V) pair is its own array of `N`
//!   parts, what vLLM-style kernels index with a block table. One block copy is
//!   `2 × layers` byte ranges.
//!
//! Inside a part, elements are token-major, `[token][kv_head][head_size]`
//! (vLLM's FlashAttention layout). A quantized part ([`DType::Int8`],
//! [`DType::Fp8E4M3`]) is followed by one little-endian `f32` scale per KV head,
//! so scales travel with their block in every copy.
#![allow(
    clippy::cast_possible_truncation,
    reason = "counts narrowed here were checked against u32 limits"
)]

use crate::batch::BlockCopy;
use crate::error::{Error, Result};
use crate::ids::BlockId;

/// Element type of the KV cache.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits (OCP E4M3FN).
    Fp8E4M3,
    /// 8-bit integer with a scale (see the backends' quantization).
    Int8,
}

impl DType {
    /// Whether elements carry a per-head scale (see [`KvLayout::part_bytes`]).
    pub const fn is_quantized(self) -> bool {
        matches!(self, DType::Fp8E4M3 | DType::Int8)
    }

    /// Bytes per element.
    pub const fn size_bytes(self) -> u32 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Fp8E4M3 | DType::Int8 => 1,
        }
    }
}

/// How a region arranges its blocks' layers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BlockOrder {
    /// Each block contiguous, all layers inside.
    BlockMajor,
    /// Each (layer, K/V) an array of blocks.
    LayerMajor,
}

/// Shape of the KV cache of one model.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct KvLayout {
    /// Transformer layers.
    pub layers: u32,
    /// Key/value heads (after grouped-query sharing).
    pub kv_heads: u32,
    /// Elements per head.
    pub head_size: u32,
    /// Tokens per block.
    pub tokens_per_block: u32,
    /// Element type.
    pub dtype: DType,
    /// Block-major or layer-major.
    pub order: BlockOrder,
}

/// One contiguous copy of bytes between two regions.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ByteRange {
    /// Offset in the source region.
    pub src: u64,
    /// Offset in the target region.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// Which half of a layer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum KvPart {
    /// Keys.
    Key = 0,
    /// Values.
    Value = 1,
}

impl KvLayout {
    /// Checks that no dimension is zero and the block size fits in `u64`.
    pub fn validate(&self) -> Result<()> {
        if self.layers == 0 || self.kv_heads == 0 || self.head_size == 0 {
            return Err(Error::ZeroLayoutDimension);
        }
        if self.tokens_per_block == 0 {
            return Err(Error::ZeroTokensPerBlock);
        }
        // Parts (2 per layer) are counted in u32.
        if self.layers > u32::MAX / 2 {
            return Err(Error::LayoutTooLarge);
        }
        self.block_bytes().map(|_| ())
    }

    /// Bytes of the elements of one (layer, K/V) part of one block.
    pub fn part_data_bytes(&self) -> Result<u64> {
        u64::from(self.kv_heads)
            .checked_mul(u64::from(self.head_size))
            .and_then(|x| x.checked_mul(u64::from(self.tokens_per_block)))
            .and_then(|x| x.checked_mul(u64::from(self.dtype.size_bytes())))
            .ok_or(Error::LengthOverflow)
    }

    /// Bytes of one (layer, K/V) part of one block: its elements, then for a
    /// quantized type one `f32` scale per KV head.
    pub fn part_bytes(&self) -> Result<u64> {
        let scales = if self.dtype.is_quantized() {
            4 * u64::from(self.kv_heads)
        } else {
            0
        };
        self.part_data_bytes()?
            .checked_add(scales)
            .ok_or(Error::LengthOverflow)
    }

    /// The same layout with another element type (for a compressed copy).
    pub const fn with_dtype(self, dtype: DType) -> Self {
        Self { dtype, ..self }
    }

    /// Bytes of one block (all layers, keys and values).
    pub fn block_bytes(&self) -> Result<u64> {
        self.part_bytes()?
            .checked_mul(2 * u64::from(self.layers))
            .ok_or(Error::LengthOverflow)
    }

    /// Bytes per token (all layers, keys and values; scales not counted).
    pub fn bytes_per_token(&self) -> Result<u64> {
        u64::from(self.kv_heads)
            .checked_mul(u64::from(self.head_size))
            .and_then(|x| x.checked_mul(2 * u64::from(self.layers)))
            .and_then(|x| x.checked_mul(u64::from(self.dtype.size_bytes())))
            .ok_or(Error::LengthOverflow)
    }

    /// Bytes of a region of `blocks` blocks.
    pub fn region_bytes(&self, blocks: u32) -> Result<u64> {
        self.block_bytes()?
            .checked_mul(u64::from(blocks))
            .ok_or(Error::LengthOverflow)
    }

    /// Number of contiguous parts a block copy expands to (cannot overflow:
    /// counted in `u64`).
    pub fn parts_per_copy(&self) -> u64 {
        match self.order {
            BlockOrder::BlockMajor => 1,
            BlockOrder::LayerMajor => 2 * u64::from(self.layers),
        }
    }

    /// Offset of the (layer, part) of `block` in a region of `region_blocks`
    /// blocks: what a kernel needs as base pointer and stride.
    pub fn offset(
        &self,
        region_blocks: u32,
        block: BlockId,
        layer: u32,
        part: KvPart,
    ) -> Result<u64> {
        if block.0 >= region_blocks {
            return Err(Error::UnknownBlock(block));
        }
        if layer >= self.layers {
            return Err(Error::LayerOutOfRange {
                layer,
                layers: self.layers,
            });
        }
        let pb = self.part_bytes()?;
        let p = 2 * u64::from(layer) + part as u64;
        let off = match self.order {
            BlockOrder::BlockMajor => u64::from(block.0)
                .checked_mul(self.block_bytes()?)
                .and_then(|o| o.checked_add(p.checked_mul(pb)?)),
            BlockOrder::LayerMajor => p
                .checked_mul(u64::from(region_blocks))
                .and_then(|o| o.checked_add(u64::from(block.0)))
                .and_then(|o| o.checked_mul(pb)),
        };
        off.ok_or(Error::LengthOverflow)
    }

    /// Expands `copies` (source blocks in a region of `src_blocks`, targets in
    /// one of `dst_blocks`) into byte ranges, merging ranges adjacent in both
    /// source and target. Layer-major copies are emitted part by part so that
    /// runs of consecutive blocks merge. Returns the number of ranges emitted.
    pub fn expand(
        &self,
        src_blocks: u32,
        dst_blocks: u32,
        copies: &[BlockCopy],
        mut emit: impl FnMut(ByteRange),
    ) -> Result<usize> {
        let pb = self.part_bytes()?;
        // Bounds of the largest offset, checked once.
        self.region_bytes(src_blocks.max(dst_blocks))?;
        let (parts, unit, stride_src, stride_dst) = match self.order {
            BlockOrder::BlockMajor => (1u64, self.block_bytes()?, 0, 0),
            BlockOrder::LayerMajor => (
                2 * u64::from(self.layers),
                pb,
                u64::from(src_blocks) * pb,
                u64::from(dst_blocks) * pb,
            ),
        };
        let mut pending: Option<ByteRange> = None;
        let mut n = 0usize;
        for p in 0..parts {
            for (k, c) in copies.iter().enumerate() {
                if c.src.0 >= src_blocks || c.dst.0 >= dst_blocks {
                    return Err(Error::CopyOutOfBounds { copy: k });
                }
                let r = ByteRange {
                    src: p * stride_src + u64::from(c.src.0) * unit,
                    dst: p * stride_dst + u64::from(c.dst.0) * unit,
                    len: unit,
                };
                match pending.as_mut() {
                    Some(q) if q.src + q.len == r.src && q.dst + q.len == r.dst => q.len += r.len,
                    _ => {
                        if let Some(q) = pending.replace(r) {
                            emit(q);
                            n += 1;
                        }
                    }
                }
            }
        }
        if let Some(q) = pending {
            emit(q);
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama8b(order: BlockOrder) -> KvLayout {
        KvLayout {
            layers: 32,
            kv_heads: 8,
            head_size: 128,
            tokens_per_block: 16,
            dtype: DType::F16,
            order,
        }
    }

    #[test]
    fn sizes() {
        let l = llama8b(BlockOrder::BlockMajor);
        assert_eq!(l.bytes_per_token().unwrap(), 131_072);
        assert_eq!(l.block_bytes().unwrap(), 2 * 1024 * 1024);
        let huge = KvLayout {
            layers: u32::MAX,
            kv_heads: u32::MAX,
            head_size: u32::MAX,
            ..l
        };
        assert_eq!(huge.block_bytes(), Err(Error::LengthOverflow));
    }

    #[test]
    fn block_major_runs_merge_into_one_range() {
        let l = llama8b(BlockOrder::BlockMajor);
        let copies: [BlockCopy; 3] = core::array::from_fn(|i| BlockCopy {
            src: BlockId(10 + i as u32),
            dst: BlockId(i as u32),
        });
        let mut out = heapless::Vec::<ByteRange, 4>::new();
        let n = l
            .expand(100, 50, &copies, |r| out.push(r).unwrap())
            .unwrap();
        assert_eq!(n, 1);
        let bb = l.block_bytes().unwrap();
        assert_eq!(
            out[0],
            ByteRange {
                src: 10 * bb,
                dst: 0,
                len: 3 * bb
            }
        );
    }

    #[test]
    fn layer_major_expands_per_part_and_merges_runs() {
        let l = KvLayout {
            layers: 2,
            ..llama8b(BlockOrder::LayerMajor)
        };
        let copies = [
            BlockCopy {
                src: BlockId(1),
                dst: BlockId(4),
            },
            BlockCopy {
                src: BlockId(2),
                dst: BlockId(5),
            },
            BlockCopy {
                src: BlockId(7),
                dst: BlockId(0),
            },
        ];
        let mut out = heapless::Vec::<ByteRange, 16>::new();
        let n = l.expand(8, 6, &copies, |r| out.push(r).unwrap()).unwrap();
        // 4 parts, each: one merged range (2 blocks) + one single range.
        assert_eq!(n, 8);
        let pb = l.part_bytes().unwrap();
        assert_eq!(
            out[0],
            ByteRange {
                src: pb,
                dst: 4 * pb,
                len: 2 * pb
            }
        );
        assert_eq!(
            out[1],
            ByteRange {
                src: 7 * pb,
                dst: 0,
                len: pb
            }
        );
        assert_eq!(out[2].src, 8 * pb + pb);
        assert_eq!(out[2].dst, 6 * pb + 4 * pb);
        let off = l.offset(8, BlockId(7), 1, KvPart::Value).unwrap();
        assert_eq!(off, (3 * 8 + 7) * pb);
    }
}
