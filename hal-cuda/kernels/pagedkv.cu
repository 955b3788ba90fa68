// pagedkv's CUDA kernels: batched block copies and per-head quantization.
//
// Compiled at run time by NVRTC for the device's architecture (see
// src/kernels.rs); kernels/pagedkv.ptx is this file compiled for compute_80,
// the fallback where NVRTC is missing. Compile with
// `--fmad=false --prec-div=true --ftz=false` so the arithmetic is IEEE, as
// hal-host's: the quantize kernels then give hal-host's bytes exactly.
//
// The conversion section (up to "Kernels") also compiles as plain C, so the
// CPU tests check it bit for bit against the `half` and `float8` crates that
// hal-host uses (tests/convert.rs).
//
// No headers: NVRTC has none without a toolkit.

#ifdef __CUDACC__
#define PKV_FN __device__ __forceinline__
#else
#define PKV_FN static inline
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// ---- Bit casts -------------------------------------------------------------

#ifdef __CUDACC__
PKV_FN u32 pkv_f2u(float f) { return __float_as_uint(f); }
PKV_FN float pkv_u2f(u32 u) { return __uint_as_float(u); }
PKV_FN u64 pkv_d2u(double d) { return (u64)__double_as_longlong(d); }
#else
PKV_FN u32 pkv_f2u(float f) { union { float f; u32 u; } x; x.f = f; return x.u; }
PKV_FN float pkv_u2f(u32 u) { union { float f; u32 u; } x; x.u = u; return x.f; }
PKV_FN u64 pkv_d2u(double d) { union { double d; u64 u; } x; x.d = d; return x.u; }
#endif

// ---- Conversions (the `half` crate's and the `float8` crate's, bit for bit) --

PKV_FN float pkv_f16_to_f32(u16 h) {
    u32 sign = (u32)(h & 0x8000u) << 16;
    u32 exp = h & 0x7C00u;
    u32 man = h & 0x03FFu;
    if ((h & 0x7FFFu) == 0) return pkv_u2f((u32)h << 16);
    if (exp == 0x7C00u) {
        if (man == 0) return pkv_u2f(sign | 0x7F800000u);
        return pkv_u2f(sign | 0x7FC00000u | (man << 13));
    }
    if (exp == 0) {
        // Subnormal: normalize.
        int e = 0;
        while ((man & 0x0400u) == 0) { man <<= 1; e++; }
        man &= 0x03FFu;
        return pkv_u2f(sign | ((u32)(127 - 15 - e + 1) << 23) | (man << 13));
    }
    return pkv_u2f(sign | (((exp >> 10) + 127 - 15) << 23) | (man << 13));
}

PKV_FN u16 pkv_f32_to_f16(float value) {
    u32 x = pkv_f2u(value);
    u32 sign = x & 0x80000000u;
    u32 exp = x & 0x7F800000u;
    u32 man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        u32 nan_bit = man == 0 ? 0 : 0x0200u;
        return (u16)((sign >> 16) | 0x7C00u | nan_bit | (man >> 13));
    }
    u32 half_sign = sign >> 16;
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1F) return (u16)(half_sign | 0x7C00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (u16)half_sign;
        u32 m = man | 0x00800000u;
        u32 half_man = m >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0 && (m & (3 * round_bit - 1)) != 0) half_man += 1;
        return (u16)(half_sign | half_man);
    }
    u32 he = (u32)half_exp << 10;
    u32 half_man = man >> 13;
    u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0 && (man & (3 * round_bit - 1)) != 0)
        return (u16)((half_sign | he | half_man) + 1);
    return (u16)(half_sign | he | half_man);
}

PKV_FN float pkv_bf16_to_f32(u16 b) {
    if ((b & 0x7FFFu) > 0x7F80u) return pkv_u2f(((u32)b | 0x0040u) << 16);
    return pkv_u2f((u32)b << 16);
}

PKV_FN u16 pkv_f32_to_bf16(float value) {
    u32 x = pkv_f2u(value);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((x >> 16) | 0x0040u);
    u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0 && (x & (3 * round_bit - 1)) != 0) return (u16)((x >> 16) + 1);
    return (u16)(x >> 16);
}

// OCP E4M3FN from the value's double: round to nearest even, saturating to
// ±448, NaN to 0x7F (NVIDIA's `__nv_cvt_double_to_fp8`, SATFINITE).
PKV_FN u8 pkv_f32_to_e4m3(float value) {
    u64 xbits = pkv_d2u((double)value);
    const u64 half_ulp = 1ull << (53 - 4 - 1);
    u8 sign = (u8)((xbits >> 63) << 7);
    u8 exp = (u8)((((u32)(xbits >> 52) & 0x7FFu) - 1023u + 7u) & 0xFFu);
    u8 mantissa = (u8)((xbits >> (53 - 4)) & 0x7u);
    u64 absx = xbits & 0x7FFFFFFFFFFFFFFFull;
    u8 res;
    if (absx <= 0x3F50000000000000ull) {
        res = 0;
    } else if (absx > 0x7FF0000000000000ull) {
        res = 0x7F;
    } else if (absx > 0x407D000000000000ull) {
        res = 0x7E;
    } else if (absx >= 0x3F90000000000000ull) {
        res = (u8)((exp << 3) | mantissa);
        u64 round = xbits & ((half_ulp << 1) - 1);
        if (round > half_ulp || (round == half_ulp && (mantissa & 1) != 0)) res = (u8)(res + 1);
    } else {
        u8 shift = (u8)(1u - exp);
        u8 m = (u8)(mantissa | (1u << 3));
        res = (u8)(m >> shift);
        u64 round = (xbits | (1ull << 52)) & ((half_ulp << (shift + 1)) - 1);
        if (round > (half_ulp << shift) || (round == (half_ulp << shift) && (res & 1) != 0))
            res = (u8)(res + 1);
    }
    return (u8)(res | sign);
}

// E4M3FN to f32, through the f16 the `float8` crate converts to.
PKV_FN float pkv_e4m3_to_f32(u8 x) {
    u16 ur = (u16)((u16)x << 8);
    u16 sign = ur & 0x8000u;
    u16 exponent = (u16)(((ur & 0x7800u) >> 1) + 0x2000u);
    u16 mantissa = (u16)((ur & 0x0700u) >> 1);
    if ((x & 0x7Fu) == 0x7Fu) {
        ur = 0x7FFFu;
    } else if (exponent == 0x2000u) {
        if (mantissa != 0) {
            mantissa = (u16)(mantissa << 1);
            while ((mantissa & 0x0400u) == 0) {
                mantissa = (u16)(mantissa << 1);
                exponent = (u16)(exponent - 0x0400u);
            }
            mantissa &= 0x03FFu;
        } else {
            exponent = 0;
        }
        ur = (u16)(sign | exponent | mantissa);
    } else {
        ur = (u16)(sign | exponent | mantissa);
    }
    return pkv_f16_to_f32(ur);
}

// Symmetric int8: half away from zero, clamped to ±127, NaN to 0 (Rust's
// saturating `as i32`, then `clamp`).
PKV_FN signed char pkv_f32_to_i8(float v) {
    float r = v >= 0.0f ? v + 0.5f : v - 0.5f;
    if (r != r) return 0;
    if (r >= 127.0f) return 127;
    if (r <= -127.0f) return -127;
    return (signed char)(int)r;
}

// Element types, as the Rust side numbers them (src/lower.rs).
#define PKV_F32 0u
#define PKV_F16 1u
#define PKV_BF16 2u
#define PKV_FP8 3u
#define PKV_I8 4u

PKV_FN float pkv_load(u32 t, const u8* p, u64 i) {
    switch (t) {
    case PKV_F32: return ((const float*)p)[i];
    case PKV_F16: return pkv_f16_to_f32(((const u16*)p)[i]);
    case PKV_BF16: return pkv_bf16_to_f32(((const u16*)p)[i]);
    case PKV_FP8: return pkv_e4m3_to_f32(p[i]);
    default: return (float)(signed char)p[i];
    }
}

PKV_FN void pkv_store(u32 t, u8* p, u64 i, float v) {
    switch (t) {
    case PKV_F32: ((float*)p)[i] = v; break;
    case PKV_F16: ((u16*)p)[i] = pkv_f32_to_f16(v); break;
    case PKV_BF16: ((u16*)p)[i] = pkv_f32_to_bf16(v); break;
    case PKV_FP8: p[i] = pkv_f32_to_e4m3(v); break;
    default: p[i] = (u8)pkv_f32_to_i8(v); break;
    }
}

// |x| by clearing the sign bit (as hal-host).
PKV_FN float pkv_abs(float x) { return pkv_u2f(pkv_f2u(x) & 0x7FFFFFFFu); }

PKV_FN int pkv_is_finite(float x) { return (pkv_f2u(x) & 0x7F800000u) != 0x7F800000u; }

#ifdef __CUDACC__
// ---- Kernels -----------------------------------------------------------------

// One region's geometry: byte offset of (block b, part p) is
// `b * block_stride + p * part_stride` (src/lower.rs derives both strides
// from the core's `KvLayout` for either block order).
struct PkvGeom {
    u8* base;
    u64 block_stride;
    u64 part_stride;
};

// Copies every (source block, target block) pair of `pairs` for every part:
// work item = (pair, part, chunk of `chunk` bytes), one thread block per item,
// grid-stride. `V` is the widest vector every offset is aligned to.
template <typename V>
__device__ void pkv_copy_body(const u32* __restrict__ pairs, u64 items, u32 parts, u32 chunks,
                              u64 unit, u64 chunk, PkvGeom src, PkvGeom dst) {
    for (u64 item = blockIdx.x; item < items; item += gridDim.x) {
        u64 c = item % chunks;
        u64 rest = item / chunks;
        u64 part = rest % parts;
        u64 pair = rest / parts;
        u64 sb = pairs[2 * pair];
        u64 db = pairs[2 * pair + 1];
        u64 off = c * chunk;
        u64 len = unit - off < chunk ? unit - off : chunk;
        const V* __restrict__ s =
            (const V*)(src.base + sb * src.block_stride + part * src.part_stride + off);
        V* __restrict__ d = (V*)(dst.base + db * dst.block_stride + part * dst.part_stride + off);
        u64 n = len / sizeof(V);
        u64 step = blockDim.x;
        u64 i = threadIdx.x;
        // Four loads in flight per thread before their stores.
        for (; i + 3 * step < n; i += 4 * step) {
            V a = s[i], b = s[i + step], e = s[i + 2 * step], f = s[i + 3 * step];
            d[i] = a;
            d[i + step] = b;
            d[i + 2 * step] = e;
            d[i + 3 * step] = f;
        }
        for (; i < n; i += step) d[i] = s[i];
    }
}

#define PKV_COPY(name, V)                                                                   \
    extern "C" __global__ void name(const u32* pairs, u64 items, u32 parts, u32 chunks,     \
                                    u64 unit, u64 chunk, PkvGeom src, PkvGeom dst) {        \
        pkv_copy_body<V>(pairs, items, parts, chunks, unit, chunk, src, dst);               \
    }
PKV_COPY(pagedkv_copy_16, uint4)
PKV_COPY(pagedkv_copy_8, uint2)
PKV_COPY(pagedkv_copy_4, u32)
PKV_COPY(pagedkv_copy_1, u8)

// Quantizes (dir 0) or dequantizes (dir 1) each pair's block, one warp per
// (pair, part, KV head): hal-host's algorithm (src/quant.rs there) with the
// head's maximum found by a warp reduction (a maximum does not depend on
// order, so the result is the same bytes). `pairs` hold (source, target);
// the full-precision block is the source when quantizing. The scales follow
// each compressed part's `q_data` bytes of elements, one f32 per head.
extern "C" __global__ void pagedkv_quant(const u32* __restrict__ pairs, u64 items, u32 parts,
                                         u32 heads, u32 tokens, u32 dim, PkvGeom full,
                                         u32 full_type, PkvGeom q, u32 q_type, u64 q_data,
                                         u32 dir) {
    u32 lane = threadIdx.x & 31u;
    u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    u64 warps = ((u64)gridDim.x * blockDim.x) >> 5;
    u64 per_head = (u64)tokens * dim;
    for (u64 it = warp; it < items; it += warps) {
        u64 h = it % heads;
        u64 rest = it / heads;
        u64 part = rest % parts;
        u64 pair = rest / parts;
        u64 fb = pairs[2 * pair + (dir == 0 ? 0 : 1)];
        u64 qb = pairs[2 * pair + (dir == 0 ? 1 : 0)];
        u8* fp = full.base + fb * full.block_stride + part * full.part_stride;
        u8* qp = q.base + qb * q.block_stride + part * q.part_stride;
        u8* sp = qp + q_data + 4 * h;
        if (dir == 0) {
            float amax = 0.0f;
            for (u64 k = lane; k < per_head; k += 32) {
                u64 idx = (k / dim) * heads * dim + h * dim + k % dim;
                float a = pkv_abs(pkv_load(full_type, fp, idx));
                if (pkv_is_finite(a) && a > amax) amax = a;
            }
            for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
            float scale = q_type == PKV_I8 ? amax / 127.0f : amax / 448.0f;
            if (lane < 4) sp[lane] = (u8)(pkv_f2u(scale) >> (8 * lane));
            for (u64 k = lane; k < per_head; k += 32) {
                u64 idx = (k / dim) * heads * dim + h * dim + k % dim;
                float x = pkv_load(full_type, fp, idx);
                float v = scale > 0.0f ? x / scale : 0.0f;
                if (v != v) v = 0.0f;
                pkv_store(q_type, qp, idx, v);
            }
        } else {
            float scale = pkv_u2f((u32)sp[0] | ((u32)sp[1] << 8) | ((u32)sp[2] << 16) |
                                  ((u32)sp[3] << 24));
            for (u64 k = lane; k < per_head; k += 32) {
                u64 idx = (k / dim) * heads * dim + h * dim + k % dim;
                pkv_store(full_type, fp, idx, pkv_load(q_type, qp, idx) * scale);
            }
        }
    }
}
#endif
