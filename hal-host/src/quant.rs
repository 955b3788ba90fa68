//! Block quantization: f32 / f16 / bf16 KV to int8 or fp8 (E4M3) with one
//! `f32` scale per (block, layer, K/V, KV head), and back.
//!
//! # Formats
//!
//! For each head, `amax` is the largest finite `|x|` over the block's tokens
//! and the head's elements.
//!
//! - [`QuantFormat::Int8PerHead`]: `scale = amax / 127`, `q = round(x /
//!   scale)` (half away from zero) clamped to `[-127, 127]`; `x' = q · scale`.
//! - [`QuantFormat::Fp8E4M3PerHead`]: `scale = amax / 448` (E4M3's largest
//!   finite value), `q = e4m3(x / scale)` (round to nearest even,
//!   saturating); `x' = f32(q) · scale`.
//!
//! NaN becomes 0 and ±∞ saturates. A head of zeros has scale 0 and comes
//! back as exact zeros.
//!
//! # Error bound
//!
//! For a finite input `x` of a head with maximum `amax`, the value read back
//! after dequantizing into element type `out` satisfies
//! `|x' − x| ≤` [`error_bound`]`(format, x, amax, out)`:
//!
//! - int8: `amax / 254` (half a quantization step),
//! - fp8 E4M3: `|x| · 2⁻⁴` (half an ulp with 3 mantissa bits) `+ scale · 2⁻¹⁰`
//!   (half the subnormal step),
//!
//! plus the rounding of `x'` into `out`: relative `2⁻²⁴` (f32), `2⁻¹¹` (f16),
//! `2⁻⁸` (bf16), and `2⁻²⁴` absolute for f16 subnormals. The tests check
//! this bound element by element on random and adversarial blocks.

use float8::F8E4M3;
use half::{bf16, f16};
use pagedkv_core::{BlockId, DType, KvLayout, KvPart, QuantFormat, ValidatedBatch};

use crate::{HostError, HostRegion};

/// Which way [`run`] converts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Direction {
    Quantize,
    Dequantize,
}

/// The element type a format stores.
pub const fn format_dtype(format: QuantFormat) -> DType {
    match format {
        QuantFormat::Int8PerHead => DType::Int8,
        QuantFormat::Fp8E4M3PerHead => DType::Fp8E4M3,
    }
}

fn abs(x: f32) -> f32 {
    f32::from_bits(x.to_bits() & 0x7fff_ffff)
}

/// The documented bound on `|x' − x|` (see the module docs).
pub fn error_bound(format: QuantFormat, x: f32, amax: f32, out: DType) -> f32 {
    let q = match format {
        QuantFormat::Int8PerHead => amax / 254.0,
        QuantFormat::Fp8E4M3PerHead => abs(x) / 16.0 + (amax / 448.0) / 1024.0,
    };
    let back = abs(x) + q;
    let rel = match out {
        DType::F16 => 1.0 / 2048.0,
        DType::BF16 => 1.0 / 256.0,
        _ => 1.0 / 16_777_216.0,
    };
    q + back * rel + 1.0 / 16_777_216.0
}

/// Reads element `i` of type `t` at `p`.
///
/// # Safety
/// `p + i · size(t)` is readable for `size(t)` bytes.
unsafe fn load(t: DType, p: *const u8, i: usize) -> f32 {
    // SAFETY: the caller guarantees the element's bytes are readable; the
    // reads are unaligned-safe.
    unsafe {
        match t {
            DType::F32 => f32::from_le_bytes(p.add(4 * i).cast::<[u8; 4]>().read_unaligned()),
            DType::F16 => f16::from_bits(u16::from_le_bytes(
                p.add(2 * i).cast::<[u8; 2]>().read_unaligned(),
            ))
            .to_f32(),
            DType::BF16 => bf16::from_bits(u16::from_le_bytes(
                p.add(2 * i).cast::<[u8; 2]>().read_unaligned(),
            ))
            .to_f32(),
            DType::Fp8E4M3 => F8E4M3::from_bits(p.add(i).read()).to_f32(),
            DType::Int8 => f32::from(p.add(i).cast::<i8>().read()),
        }
    }
}

/// Writes element `i` of type `t` at `p`.
///
/// # Safety
/// `p + i · size(t)` is writable for `size(t)` bytes.
unsafe fn store(t: DType, p: *mut u8, i: usize, v: f32) {
    // SAFETY: the caller guarantees the element's bytes are writable.
    unsafe {
        match t {
            DType::F32 => p
                .add(4 * i)
                .cast::<[u8; 4]>()
                .write_unaligned(v.to_le_bytes()),
            DType::F16 => p
                .add(2 * i)
                .cast::<[u8; 2]>()
                .write_unaligned(f16::from_f32(v).to_bits().to_le_bytes()),
            DType::BF16 => p
                .add(2 * i)
                .cast::<[u8; 2]>()
                .write_unaligned(bf16::from_f32(v).to_bits().to_le_bytes()),
            DType::Fp8E4M3 => p.add(i).write(F8E4M3::from_f32(v).to_bits()),
            DType::Int8 => p.add(i).cast::<i8>().write(quantize_i8(v)),
        }
    }
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "saturating casts, clamped to i8's range"
)]
fn quantize_i8(v: f32) -> i8 {
    let r = if v >= 0.0 { v + 0.5 } else { v - 0.5 };
    // `as` saturates and maps NaN to 0.
    (r as i32).clamp(-127, 127) as i8
}

fn check(full: &KvLayout, q: &KvLayout, format: QuantFormat) -> Result<(), HostError> {
    if q.dtype != format_dtype(format) {
        return Err(HostError::unsupported(
            "compressed region has another element type",
        ));
    }
    if full.dtype.is_quantized() {
        return Err(HostError::unsupported("source must be f32, f16 or bf16"));
    }
    if full.with_dtype(q.dtype) != *q {
        return Err(HostError::other("regions have different shapes"));
    }
    Ok(())
}

/// Quantizes or dequantizes each copy of `batch`.
///
/// # Safety
///
/// `src` and `dst` are live regions; no other access to the batch's target
/// blocks, nor writes to its source blocks, during the call.
pub(crate) unsafe fn run(
    src: &HostRegion,
    dst: &HostRegion,
    batch: &ValidatedBatch<'_>,
    format: QuantFormat,
    dir: Direction,
) -> Result<(), HostError> {
    let (full_r, q_r) = match dir {
        Direction::Quantize => (src, dst),
        Direction::Dequantize => (dst, src),
    };
    let (full, q) = (full_r.desc.layout, q_r.desc.layout);
    check(&full, &q, format)?;
    if batch.src_blocks() != src.desc.block_count
        || batch.dst_blocks() != dst.desc.block_count
        || batch.same_region()
    {
        return Err(HostError::other("batch validated against other regions"));
    }
    let (heads, dim) = (full.kv_heads as usize, full.head_size as usize);
    let per_head = (full.tokens_per_block as usize) * dim;
    let data = usize::try_from(
        q.part_data_bytes()
            .map_err(|_| HostError::other("layout"))?,
    )
    .map_err(|_| HostError::other("part larger than the address space"))?;
    let off = |r: &HostRegion, b: BlockId, l: u32, p: KvPart| -> Result<usize, HostError> {
        let o = r
            .desc
            .layout
            .offset(r.desc.block_count, b, l, p)
            .map_err(|_| HostError::other("block outside the region"))?;
        let pb = r
            .desc
            .layout
            .part_bytes()
            .map_err(|_| HostError::other("layout"))?;
        let pb = usize::try_from(pb)
            .map_err(|_| HostError::other("part larger than the address space"))?;
        r.range(o, pb)
    };
    for c in batch.copies() {
        let (fb, qb) = match dir {
            Direction::Quantize => (c.src, c.dst),
            Direction::Dequantize => (c.dst, c.src),
        };
        for l in 0..full.layers {
            for part in [KvPart::Key, KvPart::Value] {
                // SAFETY: both offsets were range-checked against their
                // regions for a whole part; element indices below stay within
                // `heads × tokens × dim` elements and `heads` scales, which is
                // exactly a part. The regions are live and not otherwise
                // accessed (caller).
                unsafe {
                    let fp = full_r.ptr.as_ptr().add(off(full_r, fb, l, part)?);
                    let qp = q_r.ptr.as_ptr().add(off(q_r, qb, l, part)?);
                    let sp = qp.add(data);
                    for h in 0..heads {
                        let idx = |k: usize| (k / dim) * heads * dim + h * dim + k % dim;
                        match dir {
                            Direction::Quantize => {
                                let mut amax = 0f32;
                                for k in 0..per_head {
                                    let a = abs(load(full.dtype, fp, idx(k)));
                                    if a.is_finite() && a > amax {
                                        amax = a;
                                    }
                                }
                                let scale = match format {
                                    QuantFormat::Int8PerHead => amax / 127.0,
                                    QuantFormat::Fp8E4M3PerHead => amax / 448.0,
                                };
                                sp.add(4 * h)
                                    .cast::<[u8; 4]>()
                                    .write_unaligned(scale.to_le_bytes());
                                for k in 0..per_head {
                                    let x = load(full.dtype, fp, idx(k));
                                    let v = if scale > 0.0 { x / scale } else { 0.0 };
                                    let v = if v.is_nan() { 0.0 } else { v };
                                    store(q.dtype, qp, idx(k), v);
                                }
                            }
                            Direction::Dequantize => {
                                let scale = f32::from_le_bytes(
                                    sp.add(4 * h).cast::<[u8; 4]>().read_unaligned(),
                                );
                                for k in 0..per_head {
                                    let v = load(q.dtype, qp, idx(k)) * scale;
                                    store(full.dtype, fp, idx(k), v);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
