#![doc = include_str!("../README.md")]
#![no_std]
#![deny(
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]

#[cfg(feature = "alloc")]
extern crate alloc;

mod common;
mod copy;
mod error;
#[cfg(feature = "alloc")]
mod heap;
mod meta;
pub mod quant;
mod region;
mod stat;

pub use error::HostError;
#[cfg(feature = "alloc")]
pub use heap::HostBackend;
pub use meta::{MetaRegion, MetadataBackend};
pub use region::HostRegion;
pub use stat::StaticBackend;

/// Alignment of every region (a cache line, and enough for any SIMD load).
pub const REGION_ALIGN: usize = 64;

/// A fence of the host backend: copies complete before `copy_blocks`
/// returns, so every fence is signalled.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct HostFence(pub u64);

#[cfg(all(test, feature = "alloc"))]
#[allow(clippy::cast_possible_truncation, reason = "small test values")]
mod tests {
    use alloc::vec;
    use alloc::vec::Vec;

    use pagedkv_core::{
        Backend, BatchValidator, BlockCopy, BlockId, BlockOrder, DType, KvLayout, MemoryKind,
        QuantFormat, Quantize, RegionDesc,
    };

    use super::*;

    fn layout(order: BlockOrder, dtype: DType) -> KvLayout {
        KvLayout {
            layers: 2,
            kv_heads: 2,
            head_size: 4,
            tokens_per_block: 2,
            dtype,
            order,
        }
    }

    fn exercise<B: Backend<Region = HostRegion> + Quantize>(be: &mut B) {
        for order in [BlockOrder::BlockMajor, BlockOrder::LayerMajor] {
            let l = layout(order, DType::F16);
            let bb = l.block_bytes().unwrap() as usize;
            let desc = RegionDesc {
                block_count: 6,
                layout: l,
                memory: MemoryKind::Device(0),
            };
            let a = be.create_region(&desc).unwrap();
            let b = be
                .create_region(&RegionDesc {
                    memory: MemoryKind::Host,
                    ..desc
                })
                .unwrap();
            assert_eq!(a.as_ptr() as usize % REGION_ALIGN, 0);
            let data: Vec<u8> = (0..6 * bb).map(|i| (i % 251) as u8).collect();
            be.write_bytes(&a, 0, &data).unwrap();
            let mut v = BatchValidator::with_capacity(6);
            let within = [
                BlockCopy {
                    src: BlockId(0),
                    dst: BlockId(4),
                },
                BlockCopy {
                    src: BlockId(1),
                    dst: BlockId(5),
                },
            ];
            let across = [
                BlockCopy {
                    src: BlockId(4),
                    dst: BlockId(0),
                },
                BlockCopy {
                    src: BlockId(2),
                    dst: BlockId(3),
                },
            ];
            // SAFETY: regions of `be`, live; copies are synchronous.
            unsafe {
                be.copy_blocks(&a, &a, v.validate(&within, 6, 6, true).unwrap())
                    .unwrap();
                be.copy_blocks(&a, &b, v.validate(&across, 6, 6, false).unwrap())
                    .unwrap();
            }
            let mut got = vec![0u8; 6 * bb];
            be.read_bytes(&a, 0, &mut got).unwrap();
            let mut want = data.clone();
            let block_of = |buf: &Vec<u8>, blk: usize| -> Vec<u8> {
                let mut out = Vec::new();
                for p in 0..4u32 {
                    let part = if p % 2 == 0 {
                        pagedkv_core::KvPart::Key
                    } else {
                        pagedkv_core::KvPart::Value
                    };
                    let o = l.offset(6, BlockId(blk as u32), p / 2, part).unwrap() as usize;
                    out.extend_from_slice(&buf[o..o + bb / 4]);
                }
                out
            };
            let set_block = |buf: &mut Vec<u8>, blk: usize, bytes: &[u8]| {
                for p in 0..4u32 {
                    let part = if p % 2 == 0 {
                        pagedkv_core::KvPart::Key
                    } else {
                        pagedkv_core::KvPart::Value
                    };
                    let o = l.offset(6, BlockId(blk as u32), p / 2, part).unwrap() as usize;
                    buf[o..o + bb / 4].copy_from_slice(&bytes[p as usize * bb / 4..][..bb / 4]);
                }
            };
            let b0 = block_of(&want, 0);
            let b1 = block_of(&want, 1);
            set_block(&mut want, 4, &b0);
            set_block(&mut want, 5, &b1);
            assert_eq!(got, want, "{order:?} copy within");
            let mut gb = vec![0u8; 6 * bb];
            be.read_bytes(&b, 0, &mut gb).unwrap();
            assert_eq!(block_of(&gb, 0), b0, "{order:?} across");
            assert_eq!(block_of(&gb, 3), block_of(&want, 2), "{order:?} across");
            assert!(be.write_bytes(&a, (6 * bb) as u64 - 1, &[0, 0]).is_err());
            // Quantize round trip through int8.
            let q = be
                .create_region(&RegionDesc {
                    layout: l.with_dtype(DType::Int8),
                    ..desc
                })
                .unwrap();
            let back = be.create_region(&desc).unwrap();
            let vals: Vec<u8> = (0..6 * bb / 2)
                .flat_map(|i| {
                    half::f16::from_f32(i as f32 / 7.0 - 3.0)
                        .to_bits()
                        .to_le_bytes()
                })
                .collect();
            be.write_bytes(&a, 0, &vals).unwrap();
            let ids: Vec<BlockCopy> = (0..6)
                .map(|i| BlockCopy {
                    src: BlockId(i),
                    dst: BlockId(i),
                })
                .collect();
            // SAFETY: as above.
            unsafe {
                be.quantize(
                    &a,
                    &q,
                    v.validate(&ids, 6, 6, false).unwrap(),
                    QuantFormat::Int8PerHead,
                )
                .unwrap();
                be.dequantize(
                    &q,
                    &back,
                    v.validate(&ids, 6, 6, false).unwrap(),
                    QuantFormat::Int8PerHead,
                )
                .unwrap();
            }
            let mut out = vec![0u8; 6 * bb];
            be.read_bytes(&back, 0, &mut out).unwrap();
            // Every head's maximum is at most the largest value written.
            let amax = (6 * bb / 2) as f32 / 7.0;
            for (x, y) in vals.chunks(2).zip(out.chunks(2)) {
                let x = half::f16::from_le_bytes([x[0], x[1]]).to_f32();
                let y = half::f16::from_le_bytes([y[0], y[1]]).to_f32();
                assert!(
                    (x - y).abs()
                        <= quant::error_bound(QuantFormat::Int8PerHead, x, amax, DType::F16)
                );
            }
            // SAFETY: nothing in flight.
            unsafe {
                be.destroy_region(back);
                be.destroy_region(q);
                be.destroy_region(b);
                be.destroy_region(a);
            }
        }
    }

    #[test]
    fn heap_backend_copies_and_quantizes() {
        exercise(&mut HostBackend::new());
    }

    #[test]
    fn static_backend_copies_and_quantizes() {
        let mut arena = vec![0u8; 1 << 16];
        let mut be = StaticBackend::new(&mut arena);
        exercise(&mut be);
        assert_eq!(
            be.remaining(),
            1 << 16,
            "regions destroyed in reverse give their bytes back"
        );
    }

    #[test]
    fn foreign_regions_are_refused() {
        let mut a = HostBackend::new();
        let mut b = HostBackend::new();
        let desc = RegionDesc {
            block_count: 1,
            layout: layout(BlockOrder::BlockMajor, DType::F32),
            memory: MemoryKind::Host,
        };
        let r = a.create_region(&desc).unwrap();
        assert!(b.write_bytes(&r, 0, &[1]).is_err());
        // SAFETY: nothing in flight.
        unsafe { a.destroy_region(r) };
    }
}
