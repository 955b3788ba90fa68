//! Lowering a validated batch into kernel arguments and launch geometry:
//! everything the backend decides on the CPU, tested without a GPU.
//!
//! Every byte a kernel touches is `base + block × block_stride + part ×
//! part_stride + offset` with `block` below the region's block count (the
//! core validated the batch against it, and [`check_pair`] checks the
//! regions are the ones it was validated against), `part` below the layout's
//! parts and `offset` below the part's bytes: so no launch reads or writes
//! outside its two regions.

use pagedkv_core::{BlockCopy, BlockOrder, DType, KvLayout, QuantFormat, RegionDesc};

use crate::CudaError;

/// Element type codes, as `kernels/pagedkv.cu` numbers them.
pub(crate) const fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::Fp8E4M3 => 3,
        DType::Int8 => 4,
    }
}

/// A region's addressing, the kernels' `PkvGeom`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geom {
    /// Device address of the region's first byte.
    pub base: u64,
    /// Bytes from one block to the next (within a part).
    pub block_stride: u64,
    /// Bytes from one (layer, K/V) part to the next (within a block).
    pub part_stride: u64,
}

// SAFETY: `Geom` is `repr(C)` of three `u64`s, the layout of the kernels'
// `PkvGeom` (a pointer and two `unsigned long long` on a 64-bit target).
unsafe impl cudarc::driver::DeviceRepr for Geom {}

/// The geometry of a region of `desc` at device address `base`.
pub fn geometry(desc: &RegionDesc, base: u64) -> Result<Geom, CudaError> {
    let l = &desc.layout;
    let pb = l.part_bytes()?;
    Ok(match l.order {
        BlockOrder::BlockMajor => Geom {
            base,
            block_stride: l.block_bytes()?,
            part_stride: pb,
        },
        BlockOrder::LayerMajor => Geom {
            base,
            block_stride: pb,
            part_stride: pb
                .checked_mul(u64::from(desc.block_count))
                .ok_or(CudaError::other("region larger than 2^64 bytes"))?,
        },
    })
}

/// Which copy kernel: the widest access every offset is aligned to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// 16-byte vectors (`uint4`).
    W16,
    /// 8-byte vectors.
    W8,
    /// 4-byte words.
    W4,
    /// Bytes.
    W1,
}

impl Width {
    /// The kernel's name in `kernels/pagedkv.cu`.
    pub const fn kernel(self) -> &'static str {
        match self {
            Width::W16 => "pagedkv_copy_16",
            Width::W8 => "pagedkv_copy_8",
            Width::W4 => "pagedkv_copy_4",
            Width::W1 => "pagedkv_copy_1",
        }
    }

    fn of(align: u64) -> Self {
        match align.trailing_zeros() {
            4.. => Width::W16,
            3 => Width::W8,
            2 => Width::W4,
            _ => Width::W1,
        }
    }
}

/// Bytes one thread block copies per work item.
pub const CHUNK_BYTES: u64 = 64 * 1024;
/// Threads per block of every kernel.
pub const THREADS: u32 = 256;
/// Resident blocks per multiprocessor the grid is sized for (the kernels
/// loop over the rest).
pub const BLOCKS_PER_SM: u32 = 32;

/// One launch of a copy kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyLaunch {
    /// The kernel.
    pub width: Width,
    /// Work items: pairs × parts × chunks.
    pub items: u64,
    /// Contiguous pieces per block: 1 (block-major) or 2 × layers.
    pub parts: u32,
    /// Chunks per piece.
    pub chunks: u32,
    /// Bytes of one piece.
    pub unit: u64,
    /// Bytes of a chunk (the last one of a piece may be shorter).
    pub chunk: u64,
    /// Thread blocks.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
}

fn grid_for(items: u64, per_block: u64, sms: u32) -> u32 {
    let want = items.div_ceil(per_block).max(1);
    let cap = u64::from(sms.max(1)) * u64::from(BLOCKS_PER_SM);
    u32::try_from(want.min(cap)).unwrap_or(u32::MAX)
}

/// The launch copying `pairs` block pairs of `layout` from `src` to `dst`.
pub fn plan_copy(
    layout: &KvLayout,
    pairs: usize,
    src: &Geom,
    dst: &Geom,
    sms: u32,
) -> Result<CopyLaunch, CudaError> {
    let (unit, parts) = match layout.order {
        BlockOrder::BlockMajor => (layout.block_bytes()?, 1),
        BlockOrder::LayerMajor => (layout.part_bytes()?, 2 * layout.layers),
    };
    let chunk = CHUNK_BYTES.min(unit);
    let chunks = u32::try_from(unit.div_ceil(chunk))
        .map_err(|_| CudaError::other("a block part has more than 2^32 chunks"))?;
    let items = (pairs as u64)
        .checked_mul(u64::from(parts))
        .and_then(|x| x.checked_mul(u64::from(chunks)))
        .ok_or(CudaError::other("batch has more than 2^64 work items"))?;
    // A block-major copy has one part: its part stride is never used.
    let part_strides = if parts > 1 {
        [src.part_stride, dst.part_stride]
    } else {
        [0, 0]
    };
    let align = [
        src.base,
        src.block_stride,
        dst.base,
        dst.block_stride,
        unit,
        chunk,
    ]
    .iter()
    .chain(&part_strides)
    .fold(16u64, |a, &x| {
        if x == 0 {
            a
        } else {
            a.min(1 << x.trailing_zeros())
        }
    });
    Ok(CopyLaunch {
        width: Width::of(align),
        items,
        parts,
        chunks,
        unit,
        chunk,
        grid: grid_for(items, 1, sms),
        block: THREADS,
    })
}

/// One launch of the quantize kernel (either direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantLaunch {
    /// Work items (one warp each): pairs × parts × heads.
    pub items: u64,
    /// Parts per block (2 × layers).
    pub parts: u32,
    /// KV heads.
    pub heads: u32,
    /// Tokens per block.
    pub tokens: u32,
    /// Elements per head.
    pub dim: u32,
    /// Full-precision element type code.
    pub full_type: u32,
    /// Compressed element type code.
    pub q_type: u32,
    /// Bytes of elements in a compressed part (its scales follow).
    pub q_data: u64,
    /// Thread blocks.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
}

/// The element type a format stores (hal-host's choice).
pub const fn format_dtype(format: QuantFormat) -> DType {
    pagedkv_hal_host::quant::format_dtype(format)
}

/// The launch converting `pairs` blocks between `full` and `q` (checked as
/// hal-host checks them).
pub fn plan_quant(
    full: &KvLayout,
    q: &KvLayout,
    format: QuantFormat,
    pairs: usize,
    sms: u32,
) -> Result<QuantLaunch, CudaError> {
    if q.dtype != format_dtype(format) {
        return Err(CudaError::unsupported(
            "compressed region has another element type",
        ));
    }
    if full.dtype.is_quantized() {
        return Err(CudaError::unsupported("source must be f32, f16 or bf16"));
    }
    if full.with_dtype(q.dtype) != *q {
        return Err(CudaError::other("regions have different shapes"));
    }
    let parts = 2 * full.layers;
    let items = (pairs as u64)
        .checked_mul(u64::from(parts))
        .and_then(|x| x.checked_mul(u64::from(full.kv_heads)))
        .ok_or(CudaError::other("batch has more than 2^64 work items"))?;
    let warps = u64::from(THREADS / 32);
    Ok(QuantLaunch {
        items,
        parts,
        heads: full.kv_heads,
        tokens: full.tokens_per_block,
        dim: full.head_size,
        full_type: dtype_code(full.dtype),
        q_type: dtype_code(q.dtype),
        q_data: q.part_data_bytes()?,
        grid: grid_for(items, warps, sms),
        block: THREADS,
    })
}

/// The (source, target) block indices of `copies`, flattened for the kernels.
pub fn flatten(copies: &[BlockCopy], out: &mut Vec<u32>) {
    out.clear();
    out.extend(copies.iter().flat_map(|c| [c.src.0, c.dst.0]));
}

/// How a batch moves: the gather kernel, or one `cuMemcpyAsync` per merged
/// byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CopyStrategy {
    /// The kernel, unless the batch merges into a few long runs
    /// ([`MEMCPY_MAX_RANGES`] ranges of [`MEMCPY_MIN_BYTES`] or more).
    #[default]
    Auto,
    /// Always the kernel.
    Kernel,
    /// Always the copy engine, range by range (slow for scattered pieces:
    /// vLLM's method, kept for comparison).
    Memcpy,
}

/// At most this many merged ranges go through the copy engine under `Auto`.
pub const MEMCPY_MAX_RANGES: usize = 4;
/// ... each at least this long.
pub const MEMCPY_MIN_BYTES: u64 = 4 << 20;

/// Whether `Auto` sends a batch to the copy engine: only a batch of at most
/// [`MEMCPY_MAX_RANGES`] pieces can merge into few enough ranges, so larger
/// ones are decided without expanding them.
pub fn wants_memcpy(
    layout: &KvLayout,
    copies: &[BlockCopy],
    src_blocks: u32,
    dst_blocks: u32,
) -> bool {
    let pieces = copies.len() as u64 * layout.parts_per_copy();
    if pieces == 0 || pieces > 64 {
        return false;
    }
    let mut ranges = 0usize;
    let mut short = false;
    let ok = layout.expand(src_blocks, dst_blocks, copies, |r| {
        ranges += 1;
        short |= r.len < MEMCPY_MIN_BYTES;
    });
    ok.is_ok() && ranges <= MEMCPY_MAX_RANGES && !short
}

/// Whether two region descriptions can be one batch's source and target.
pub fn check_pair(src: &RegionDesc, dst: &RegionDesc) -> Result<(), CudaError> {
    let (sl, dl) = (&src.layout, &dst.layout);
    if sl.block_bytes()? != dl.block_bytes()? || sl.order != dl.order || sl.layers != dl.layers {
        return Err(CudaError::other("regions have different block layouts"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, reason = "small test values")]
mod tests {
    use super::*;
    use pagedkv_core::{BlockId, MemoryKind};

    fn llama(order: BlockOrder) -> KvLayout {
        KvLayout {
            layers: 32,
            kv_heads: 8,
            head_size: 128,
            tokens_per_block: 16,
            dtype: DType::F16,
            order,
        }
    }

    fn desc(order: BlockOrder, blocks: u32) -> RegionDesc {
        RegionDesc {
            block_count: blocks,
            layout: llama(order),
            memory: MemoryKind::Device(0),
        }
    }

    /// The offset the kernel computes for (block, part, byte) is the core's.
    #[test]
    fn geometry_matches_the_core_offsets() {
        for order in [BlockOrder::BlockMajor, BlockOrder::LayerMajor] {
            let d = desc(order, 100);
            let g = geometry(&d, 0).unwrap();
            for (b, layer, part) in [(0, 0, 0), (7, 3, 1), (99, 31, 1), (42, 17, 0)] {
                let kp = if part == 0 {
                    pagedkv_core::KvPart::Key
                } else {
                    pagedkv_core::KvPart::Value
                };
                let want = d.layout.offset(100, BlockId(b), layer, kp).unwrap();
                let p = u64::from(2 * layer + part);
                assert_eq!(u64::from(b) * g.block_stride + p * g.part_stride, want);
            }
        }
    }

    #[test]
    fn a_layer_major_swap_is_one_launch_of_16_byte_copies() {
        let d = desc(BlockOrder::LayerMajor, 4000);
        let g = geometry(&d, 1 << 30).unwrap();
        let h = geometry(&d, 0x7f00_0000_0000).unwrap();
        let l = plan_copy(&d.layout, 2000, &g, &h, 132).unwrap();
        // 64 pieces of 32 KiB per block, one chunk each.
        assert_eq!((l.parts, l.unit, l.chunks), (64, 32 * 1024, 1));
        assert_eq!(l.items, 2000 * 64);
        assert_eq!(l.width, Width::W16);
        assert_eq!(l.grid, 132 * BLOCKS_PER_SM);
        assert_eq!(l.block, THREADS);
        // Block-major: one 2 MiB piece per block, in 64 KiB chunks.
        let d = desc(BlockOrder::BlockMajor, 4000);
        let g = geometry(&d, 0).unwrap();
        let l = plan_copy(&d.layout, 3, &g, &g, 132).unwrap();
        assert_eq!((l.parts, l.chunks, l.items), (1, 32, 96));
        assert_eq!(l.grid, 96, "no more blocks than work items");
    }

    #[test]
    fn odd_sizes_fall_back_to_narrower_accesses() {
        let width = |order, f: &dyn Fn(&mut KvLayout)| {
            let mut d = desc(order, 10);
            f(&mut d.layout);
            let g = geometry(&d, 0).unwrap();
            plan_copy(&d.layout, 1, &g, &g, 1).unwrap().width
        };
        let tiny = |l: &mut KvLayout| {
            l.head_size = 3;
            l.kv_heads = 1;
            l.tokens_per_block = 1;
        };
        // 6-byte parts: a 384-byte block-major block is 16-aligned, a
        // layer-major piece of 6 bytes is not even 4-aligned.
        assert_eq!(width(BlockOrder::BlockMajor, &tiny), Width::W16);
        assert_eq!(width(BlockOrder::LayerMajor, &tiny), Width::W1);
        let f32_one = |l: &mut KvLayout| {
            tiny(l);
            l.head_size = 1;
            l.dtype = DType::F32;
        };
        assert_eq!(width(BlockOrder::LayerMajor, &f32_one), Width::W4);
        // An int8 part of 3 bytes and 4 scale bytes: 14-byte blocks.
        let int8 = |l: &mut KvLayout| {
            tiny(l);
            l.layers = 1;
            l.dtype = DType::Int8;
        };
        assert_eq!(width(BlockOrder::BlockMajor, &int8), Width::W1);
        let d = desc(BlockOrder::BlockMajor, 10);
        let g = geometry(&d, 0).unwrap();
        let moved = Geom { base: 8, ..g };
        assert_eq!(
            plan_copy(&d.layout, 1, &moved, &g, 1).unwrap().width,
            Width::W8
        );
    }

    #[test]
    fn quantize_launches_one_warp_per_head() {
        let full = llama(BlockOrder::LayerMajor);
        let q = full.with_dtype(DType::Int8);
        let l = plan_quant(&full, &q, QuantFormat::Int8PerHead, 2000, 132).unwrap();
        assert_eq!(l.items, 2000 * 64 * 8);
        assert_eq!((l.full_type, l.q_type), (1, 4));
        assert_eq!(l.q_data, 8 * 16 * 128);
        assert_eq!(l.grid, 132 * BLOCKS_PER_SM);
        assert!(plan_quant(&full, &q, QuantFormat::Fp8E4M3PerHead, 1, 1).is_err());
        assert!(plan_quant(&q, &q, QuantFormat::Int8PerHead, 1, 1).is_err());
        let other = KvLayout { layers: 2, ..q };
        assert!(plan_quant(&full, &other, QuantFormat::Int8PerHead, 1, 1).is_err());
    }

    #[test]
    fn only_few_long_runs_go_to_the_copy_engine() {
        let run = |n: u32, from: u32| -> Vec<BlockCopy> {
            (0..n)
                .map(|i| BlockCopy {
                    src: BlockId(from + i),
                    dst: BlockId(i),
                })
                .collect()
        };
        let bm = llama(BlockOrder::BlockMajor);
        assert!(wants_memcpy(&bm, &run(8, 10), 100, 100), "one 16 MiB run");
        assert!(!wants_memcpy(&bm, &run(1, 10), 100, 100), "2 MiB is short");
        let scattered: Vec<BlockCopy> = (0..8)
            .map(|i| BlockCopy {
                src: BlockId(2 * i),
                dst: BlockId(i),
            })
            .collect();
        assert!(!wants_memcpy(&bm, &scattered, 100, 100));
        let lm = llama(BlockOrder::LayerMajor);
        assert!(
            !wants_memcpy(&lm, &run(8, 10), 100, 100),
            "64 ranges of 256 KiB"
        );
        assert!(!wants_memcpy(&bm, &[], 100, 100));
        let mut out = Vec::new();
        flatten(&run(2, 5), &mut out);
        assert_eq!(out, [5, 0, 6, 1]);
    }

    #[test]
    fn mismatched_regions_are_refused() {
        let a = desc(BlockOrder::BlockMajor, 10);
        let mut b = a;
        b.layout.order = BlockOrder::LayerMajor;
        assert!(check_pair(&a, &b).is_err());
        b = a;
        b.layout.dtype = DType::F32;
        assert!(check_pair(&a, &b).is_err());
        assert!(check_pair(&a, &a).is_ok());
    }
}
