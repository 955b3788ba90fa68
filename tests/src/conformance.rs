//! The backend conformance suite: every `Backend` must pass it (hal-host,
//! and the Vulkan and CUDA backends). Each function panics with a message
//! naming what failed.

use pagedkv_core::{
    Backend, BackendError, BatchValidator, BlockCopy, BlockId, BlockOrder, DType, ErrorKind,
    KvLayout, MemoryKind, QuantFormat, Quantize, RegionDesc,
};

/// A small layout for tests (block of `2 × layers × 2 × 4 × 8` elements).
pub fn small_layout(order: BlockOrder, dtype: DType) -> KvLayout {
    KvLayout {
        layers: 3,
        kv_heads: 2,
        head_size: 8,
        tokens_per_block: 4,
        dtype,
        order,
    }
}

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// The byte pattern of (region tag, block, byte index).
fn pattern(tag: u8, block: u32, i: usize) -> u8 {
    (tag as usize * 131 + block as usize * 31 + i * 7 + (i >> 8)) as u8
}

fn block_bytes(layout: &KvLayout) -> usize {
    layout.block_bytes().unwrap() as usize
}

/// The (layer, K/V) parts of a block, in order, with their byte offsets.
fn parts<B: Backend>(be: &B, r: &B::Region, b: u32) -> Vec<u64> {
    let d = be.region_desc(r);
    let l = d.layout;
    (0..2 * l.layers)
        .map(|p| {
            let part = if p % 2 == 0 {
                pagedkv_core::KvPart::Key
            } else {
                pagedkv_core::KvPart::Value
            };
            l.offset(d.block_count, BlockId(b), p / 2, part).unwrap()
        })
        .collect()
}

/// Reads the bytes of block `b` (every part, in part order).
pub fn read_block<B: Backend>(be: &mut B, r: &B::Region, b: u32) -> Vec<u8> {
    let l = be.region_desc(r).layout;
    let pb = l.part_bytes().unwrap() as usize;
    let mut out = vec![0u8; block_bytes(&l)];
    for (off, chunk) in parts(be, r, b).into_iter().zip(out.chunks_mut(pb)) {
        be.read_bytes(r, off, chunk).expect("read_bytes");
    }
    out
}

/// Writes the bytes of block `b` (every part, in part order).
pub fn write_block<B: Backend>(be: &mut B, r: &B::Region, b: u32, data: &[u8]) {
    let l = be.region_desc(r).layout;
    let pb = l.part_bytes().unwrap() as usize;
    for (off, chunk) in parts(be, r, b).into_iter().zip(data.chunks(pb)) {
        be.write_bytes(r, off, chunk).expect("write_bytes");
    }
}

fn fill<B: Backend>(be: &mut B, r: &B::Region, tag: u8) {
    let d = be.region_desc(r);
    let n = block_bytes(&d.layout);
    for b in 0..d.block_count {
        let data: Vec<u8> = (0..n).map(|i| pattern(tag, b, i)).collect();
        write_block(be, r, b, &data);
    }
}

fn expect_block<B: Backend>(be: &mut B, r: &B::Region, b: u32, tag: u8, from: u32, what: &str) {
    let got = read_block(be, r, b);
    let want: Vec<u8> = (0..got.len()).map(|i| pattern(tag, from, i)).collect();
    assert!(
        got == want,
        "{what}: block {b} should hold block {from} of region {tag}"
    );
}

fn copy<B: Backend>(
    be: &mut B,
    src: &B::Region,
    dst: &B::Region,
    copies: &[BlockCopy],
    same: bool,
) {
    let (sn, dn) = (
        be.region_desc(src).block_count,
        be.region_desc(dst).block_count,
    );
    let mut v = BatchValidator::with_capacity(sn.max(dn));
    let batch = v.validate(copies, sn, dn, same).expect("valid batch");
    // SAFETY: both regions were created by `be`, are live, and nothing else
    // touches them until the fence is waited just below.
    let fence = unsafe { be.copy_blocks(src, dst, batch) }.expect("copy_blocks");
    be.wait(&fence).expect("wait");
    assert!(be.poll(&fence).expect("poll"), "fence signalled after wait");
}

/// Patterns written read back; copies within one region and across two,
/// both block orders; thousands of scattered blocks in one batch.
pub fn copies<B: Backend>(be: &mut B, memory: [MemoryKind; 2]) {
    for order in [BlockOrder::BlockMajor, BlockOrder::LayerMajor] {
        let layout = small_layout(order, DType::F16);
        let a = be
            .create_region(&RegionDesc {
                block_count: 64,
                layout,
                memory: memory[0],
            })
            .expect("region a");
        let b = be
            .create_region(&RegionDesc {
                block_count: 48,
                layout,
                memory: memory[1],
            })
            .expect("region b");
        assert_eq!(be.region_desc(&a).block_count, 64);
        fill(be, &a, 1);
        fill(be, &b, 2);
        for blk in [0, 17, 63] {
            expect_block(be, &a, blk, 1, blk, "write/read");
        }
        // Within a region: a run (merged ranges) and scattered blocks.
        let within: Vec<BlockCopy> = (0..8)
            .map(|i| BlockCopy {
                src: BlockId(i),
                dst: BlockId(40 + i),
            })
            .chain([
                BlockCopy {
                    src: BlockId(20),
                    dst: BlockId(9),
                },
                BlockCopy {
                    src: BlockId(20),
                    dst: BlockId(63),
                },
            ])
            .collect();
        copy(be, &a, &a, &within, true);
        for c in &within {
            expect_block(be, &a, c.dst.0, 1, c.src.0, "copy within a region");
        }
        expect_block(be, &a, 8, 1, 8, "untouched block");
        // Across regions.
        let across: Vec<BlockCopy> = (0..48)
            .map(|i| BlockCopy {
                src: BlockId(63 - i),
                dst: BlockId(i),
            })
            .collect();
        copy(be, &a, &b, &across, false);
        for c in &across {
            let from = if within.iter().any(|w| w.dst == c.src) {
                within.iter().find(|w| w.dst == c.src).unwrap().src.0
            } else {
                c.src.0
            };
            expect_block(be, &b, c.dst.0, 1, from, "copy across regions");
        }
        // SAFETY: no batch is in flight (every fence was waited).
        unsafe {
            be.destroy_region(a);
            be.destroy_region(b);
        }
    }
    // Thousands of scattered blocks in one batch.
    let layout = small_layout(BlockOrder::LayerMajor, DType::BF16);
    let n = 4096u32;
    let a = be
        .create_region(&RegionDesc {
            block_count: n,
            layout,
            memory: memory[0],
        })
        .expect("big a");
    let b = be
        .create_region(&RegionDesc {
            block_count: n,
            layout,
            memory: memory[1],
        })
        .expect("big b");
    fill(be, &a, 3);
    let mut perm: Vec<u32> = (0..n).collect();
    let mut seed = 0x9e37_79b9_u64;
    for i in (1..perm.len()).rev() {
        let j = (xorshift(&mut seed) % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    let copies: Vec<BlockCopy> = perm
        .iter()
        .enumerate()
        .take(3000)
        .map(|(i, &s)| BlockCopy {
            src: BlockId(s),
            dst: BlockId(i as u32),
        })
        .collect();
    copy(be, &a, &b, &copies, false);
    for c in copies.iter().step_by(7) {
        expect_block(be, &b, c.dst.0, 3, c.src.0, "scattered batch");
    }
    // SAFETY: no batch in flight.
    unsafe {
        be.destroy_region(a);
        be.destroy_region(b);
    }
}

/// A region no memory can hold is refused as out of memory.
pub fn out_of_memory<B: Backend>(be: &mut B, memory: MemoryKind) {
    let layout = KvLayout {
        layers: 80,
        kv_heads: 8,
        head_size: 128,
        tokens_per_block: 16,
        dtype: DType::F32,
        order: BlockOrder::BlockMajor,
    };
    let err = be
        .create_region(&RegionDesc {
            block_count: u32::MAX,
            layout,
            memory,
        })
        .err()
        .expect("a 40 PiB region must be refused");
    assert_eq!(err.kind(), ErrorKind::OutOfMemory, "{err}");
}

/// Quantize then dequantize stays within the documented bound, element by element.
pub fn quantize_round_trip<B: Quantize>(
    be: &mut B,
    memory: MemoryKind,
    bound: impl Fn(QuantFormat, f32, f32, DType) -> f32,
) {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for format in [QuantFormat::Int8PerHead, QuantFormat::Fp8E4M3PerHead] {
            let full = small_layout(BlockOrder::BlockMajor, dtype);
            let qd = match format {
                QuantFormat::Int8PerHead => DType::Int8,
                QuantFormat::Fp8E4M3PerHead => DType::Fp8E4M3,
            };
            let ql = full.with_dtype(qd);
            let a = be
                .create_region(&RegionDesc {
                    block_count: 8,
                    layout: full,
                    memory,
                })
                .unwrap();
            let q = be
                .create_region(&RegionDesc {
                    block_count: 8,
                    layout: ql,
                    memory,
                })
                .unwrap();
            let back = be
                .create_region(&RegionDesc {
                    block_count: 8,
                    layout: full,
                    memory,
                })
                .unwrap();
            let elems = (block_bytes(&full) / dtype.size_bytes() as usize) as u32;
            let mut seed = 42u64;
            let mut values = vec![];
            for b in 0..8u32 {
                // Random values of varied magnitude; block 7 adversarial
                // (zeros, tiny values, one large outlier per part).
                let v: Vec<f32> = (0..elems)
                    .map(|i| match b {
                        7 if i % 97 == 0 => 1000.0,
                        7 if i % 3 == 0 => 0.0,
                        7 => 1e-4 * (i as f32),
                        _ => {
                            ((xorshift(&mut seed) % 20001) as f32 - 10000.0) / 1000.0
                                * (1 << b) as f32
                        }
                    })
                    .collect();
                let bytes: Vec<u8> = v
                    .iter()
                    .flat_map(|&x| match dtype {
                        DType::F32 => x.to_le_bytes().to_vec(),
                        DType::F16 => half::f16::from_f32(x).to_bits().to_le_bytes().to_vec(),
                        _ => half::bf16::from_f32(x).to_bits().to_le_bytes().to_vec(),
                    })
                    .collect();
                write_block(be, &a, b, &bytes);
                values.push(read_values(&read_block(be, &a, b), dtype));
            }
            let copies: Vec<BlockCopy> = (0..8)
                .map(|i| BlockCopy {
                    src: BlockId(i),
                    dst: BlockId(7 - i),
                })
                .collect();
            let inverse: Vec<BlockCopy> = copies
                .iter()
                .map(|c| BlockCopy {
                    src: c.dst,
                    dst: c.src,
                })
                .collect();
            let mut v = BatchValidator::with_capacity(8);
            // SAFETY: regions of `be`, live, no other access until waited.
            unsafe {
                let f = be
                    .quantize(&a, &q, v.validate(&copies, 8, 8, false).unwrap(), format)
                    .unwrap();
                be.wait(&f).unwrap();
                let f = be
                    .dequantize(
                        &q,
                        &back,
                        v.validate(&inverse, 8, 8, false).unwrap(),
                        format,
                    )
                    .unwrap();
                be.wait(&f).unwrap();
            }
            let (heads, dim, tokens) = (
                full.kv_heads as usize,
                full.head_size as usize,
                full.tokens_per_block as usize,
            );
            let part = heads * dim * tokens;
            for b in 0..8u32 {
                let got = read_values(&read_block(be, &back, b), dtype);
                let want = &values[b as usize];
                for (p, (gp, wp)) in got.chunks(part).zip(want.chunks(part)).enumerate() {
                    for h in 0..heads {
                        let of_head = |k: usize| (k / dim) * heads * dim + h * dim + k % dim;
                        let amax = (0..tokens * dim)
                            .map(|k| wp[of_head(k)].abs())
                            .fold(0f32, f32::max);
                        for k in 0..tokens * dim {
                            let (x, y) = (wp[of_head(k)], gp[of_head(k)]);
                            let e = (x - y).abs();
                            assert!(
                                e <= bound(format, x, amax, dtype),
                                "{dtype:?} {format:?} block {b} part {p} head {h}: {x} came back {y} (amax {amax})"
                            );
                        }
                    }
                }
            }
            // SAFETY: no batch in flight.
            unsafe {
                be.destroy_region(a);
                be.destroy_region(q);
                be.destroy_region(back);
            }
        }
    }
}

fn read_values(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DType::F16 => bytes
            .chunks(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f32())
            .collect(),
        _ => bytes
            .chunks(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f32())
            .collect(),
    }
}
