// pagedkv's Vulkan quantize / dequantize compute shader.
//
// hal-host's algorithm (hal-host/src/quant.rs): per (block, layer x K/V, KV
// head), amax = the largest finite |x|; scale = amax / 127 (int8) or
// amax / 448 (E4M3); q = round(x / scale); scales (one f32 per head) follow
// each compressed part's elements. The element conversions are bit-level
// ports of the `half` and `float8` crates hal-host uses, on 32-bit integers
// (WGSL has no 64-bit type: E4M3 rounds on the f32's bits, which gives the
// same result as the crate's rounding of the exactly converted f64).
//
// One workgroup per work item (pair, part, head); 64 invocations, each
// owning 4 consecutive elements at a time (head_size is a multiple of 4), so
// every invocation writes whole 32-bit words and none shares one.
//
// Translated to SPIR-V by hal-vulkan/shader-tool (naga); the .spv beside
// this file is committed and a test regenerates it and compares bytes.

struct Params {
    items: u32,
    parts: u32,
    heads: u32,
    tokens: u32,
    dim: u32,
    full_type: u32,
    q_type: u32,
    dir: u32,
    // Strides and offsets in 32-bit words.
    full_block: u32,
    full_part: u32,
    q_block: u32,
    q_part: u32,
    q_data: u32,
    // Work items before this dispatch (large batches take several).
    first: u32,
}

var<push_constant> p: Params;

@group(0) @binding(0) var<storage, read> pairs: array<u32>;
@group(0) @binding(1) var<storage, read_write> full: array<u32>;
@group(0) @binding(2) var<storage, read_write> q: array<u32>;

var<workgroup> amax_bits: atomic<u32>;

const F32: u32 = 0u;
const F16: u32 = 1u;
const BF16: u32 = 2u;
const FP8: u32 = 3u;

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7FFFFFFFu) > 0x7F800000u;
}

fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7F800000u) != 0x7F800000u;
}

fn abs_bits(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) & 0x7FFFFFFFu);
}

fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let exp = h & 0x7C00u;
    var man = h & 0x03FFu;
    if ((h & 0x7FFFu) == 0u) {
        return bitcast<f32>(h << 16u);
    }
    if (exp == 0x7C00u) {
        if (man == 0u) {
            return bitcast<f32>(sign | 0x7F800000u);
        }
        return bitcast<f32>(sign | 0x7FC00000u | (man << 13u));
    }
    if (exp == 0u) {
        var e = 0u;
        loop {
            if ((man & 0x0400u) != 0u) {
                break;
            }
            man = man << 1u;
            e = e + 1u;
        }
        man = man & 0x03FFu;
        return bitcast<f32>(sign | ((127u - 15u + 1u - e) << 23u) | (man << 13u));
    }
    return bitcast<f32>(sign | (((exp >> 10u) + 127u - 15u) << 23u) | (man << 13u));
}

fn f32_to_f16(value: f32) -> u32 {
    let x = bitcast<u32>(value);
    let sign = x & 0x80000000u;
    let exp = x & 0x7F800000u;
    let man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        var nan_bit = 0u;
        if (man != 0u) {
            nan_bit = 0x0200u;
        }
        return (sign >> 16u) | 0x7C00u | nan_bit | (man >> 13u);
    }
    let half_sign = sign >> 16u;
    let half_exp = i32(exp >> 23u) - 127 + 15;
    if (half_exp >= 0x1F) {
        return half_sign | 0x7C00u;
    }
    if (half_exp <= 0) {
        if (14 - half_exp > 24) {
            return half_sign;
        }
        let m = man | 0x00800000u;
        var half_man = m >> u32(14 - half_exp);
        let round_bit = 1u << u32(13 - half_exp);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) {
            half_man = half_man + 1u;
        }
        return half_sign | half_man;
    }
    let he = u32(half_exp) << 10u;
    let half_man = man >> 13u;
    let round_bit = 0x00001000u;
    if ((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u) {
        return (half_sign | he | half_man) + 1u;
    }
    return half_sign | he | half_man;
}

fn bf16_to_f32(b: u32) -> f32 {
    if ((b & 0x7FFFu) > 0x7F80u) {
        return bitcast<f32>((b | 0x0040u) << 16u);
    }
    return bitcast<f32>(b << 16u);
}

fn f32_to_bf16(value: f32) -> u32 {
    let x = bitcast<u32>(value);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
        return (x >> 16u) | 0x0040u;
    }
    let round_bit = 0x00008000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) {
        return (x >> 16u) + 1u;
    }
    return x >> 16u;
}

// OCP E4M3FN: round to nearest even, saturating to +-448, NaN to 0x7F.
fn f32_to_e4m3(value: f32) -> u32 {
    let x = bitcast<u32>(value);
    let half_ulp = 1u << 19u;
    let sign = (x >> 31u) << 7u;
    let exp = i32((x >> 23u) & 0xFFu) - 127 + 7;
    let mantissa = (x >> 20u) & 7u;
    let absx = x & 0x7FFFFFFFu;
    var res = 0u;
    if (absx <= 0x3A800000u) {
        res = 0u;
    } else if (absx > 0x7F800000u) {
        res = 0x7Fu;
    } else if (absx > 0x43E80000u) {
        res = 0x7Eu;
    } else if (absx >= 0x3C800000u) {
        res = (u32(exp) << 3u) | mantissa;
        let round = x & ((half_ulp << 1u) - 1u);
        if (round > half_ulp || (round == half_ulp && (mantissa & 1u) != 0u)) {
            res = res + 1u;
        }
    } else {
        let shift = u32(1 - exp);
        let m = mantissa | 8u;
        res = m >> shift;
        let round = (x | 0x00800000u) & ((half_ulp << (shift + 1u)) - 1u);
        let half = half_ulp << shift;
        if (round > half || (round == half && (res & 1u) != 0u)) {
            res = res + 1u;
        }
    }
    return (res | sign) & 0xFFu;
}

fn e4m3_to_f32(x: u32) -> f32 {
    var ur = x << 8u;
    let sign = ur & 0x8000u;
    var exponent = ((ur & 0x7800u) >> 1u) + 0x2000u;
    var mantissa = (ur & 0x0700u) >> 1u;
    if ((x & 0x7Fu) == 0x7Fu) {
        ur = 0x7FFFu;
    } else if (exponent == 0x2000u) {
        if (mantissa != 0u) {
            mantissa = mantissa << 1u;
            loop {
                if ((mantissa & 0x0400u) != 0u) {
                    break;
                }
                mantissa = mantissa << 1u;
                exponent = exponent - 0x0400u;
            }
            mantissa = mantissa & 0x03FFu;
        } else {
            exponent = 0u;
        }
        ur = sign | exponent | mantissa;
    } else {
        ur = sign | exponent | mantissa;
    }
    return f16_to_f32(ur);
}

fn f32_to_i8(v: f32) -> u32 {
    var r = v - 0.5;
    if (v >= 0.0) {
        r = v + 0.5;
    }
    if (is_nan(r)) {
        return 0u;
    }
    if (r >= 127.0) {
        return 127u;
    }
    if (r <= -127.0) {
        return 0x81u; // -127 as a byte
    }
    return u32(i32(r)) & 0xFFu;
}

fn i8_to_f32(b: u32) -> f32 {
    return f32((i32(b << 24u)) >> 24u);
}

// Four full-precision elements starting at element `e` (a multiple of 4)
// of the part at word `base`.
fn load4(base: u32, e: u32) -> vec4<f32> {
    if (p.full_type == F32) {
        let w = base + e;
        return vec4<f32>(bitcast<f32>(full[w]), bitcast<f32>(full[w + 1u]),
                         bitcast<f32>(full[w + 2u]), bitcast<f32>(full[w + 3u]));
    }
    let w = base + e / 2u;
    let a = full[w];
    let b = full[w + 1u];
    if (p.full_type == F16) {
        return vec4<f32>(f16_to_f32(a & 0xFFFFu), f16_to_f32(a >> 16u),
                         f16_to_f32(b & 0xFFFFu), f16_to_f32(b >> 16u));
    }
    return vec4<f32>(bf16_to_f32(a & 0xFFFFu), bf16_to_f32(a >> 16u),
                     bf16_to_f32(b & 0xFFFFu), bf16_to_f32(b >> 16u));
}

fn store4(base: u32, e: u32, v: vec4<f32>) {
    if (p.full_type == F32) {
        let w = base + e;
        full[w] = bitcast<u32>(v.x);
        full[w + 1u] = bitcast<u32>(v.y);
        full[w + 2u] = bitcast<u32>(v.z);
        full[w + 3u] = bitcast<u32>(v.w);
        return;
    }
    let w = base + e / 2u;
    if (p.full_type == F16) {
        full[w] = f32_to_f16(v.x) | (f32_to_f16(v.y) << 16u);
        full[w + 1u] = f32_to_f16(v.z) | (f32_to_f16(v.w) << 16u);
        return;
    }
    full[w] = f32_to_bf16(v.x) | (f32_to_bf16(v.y) << 16u);
    full[w + 1u] = f32_to_bf16(v.z) | (f32_to_bf16(v.w) << 16u);
}

fn encode(v: f32) -> u32 {
    if (p.q_type == FP8) {
        return f32_to_e4m3(v);
    }
    return f32_to_i8(v);
}

fn decode(b: u32) -> f32 {
    if (p.q_type == FP8) {
        return e4m3_to_f32(b);
    }
    return i8_to_f32(b);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let item = p.first + wg.x;
    if (item >= p.items) {
        return;
    }
    let h = item % p.heads;
    let rest = item / p.heads;
    let part = rest % p.parts;
    let pair = rest / p.parts;
    var fb = pairs[2u * pair];
    var qb = pairs[2u * pair + 1u];
    if (p.dir == 1u) {
        fb = pairs[2u * pair + 1u];
        qb = pairs[2u * pair];
    }
    let fbase = fb * p.full_block + part * p.full_part;
    let qbase = qb * p.q_block + part * p.q_part;
    let quads = p.tokens * p.dim / 4u;
    let row = p.heads * p.dim;
    if (p.dir == 0u) {
        if (lane == 0u) {
            atomicStore(&amax_bits, 0u);
        }
        workgroupBarrier();
        var m = 0.0;
        for (var k = lane; k < quads; k = k + 64u) {
            let e = (4u * k / p.dim) * row + h * p.dim + (4u * k) % p.dim;
            let x = load4(fbase, e);
            for (var j = 0u; j < 4u; j = j + 1u) {
                let a = abs_bits(x[j]);
                if (is_finite(a) && a > m) {
                    m = a;
                }
            }
        }
        // Non-negative finite floats order as their bits.
        atomicMax(&amax_bits, bitcast<u32>(m));
        workgroupBarrier();
        let amax = bitcast<f32>(atomicLoad(&amax_bits));
        var scale = amax / 448.0;
        if (p.q_type != FP8) {
            scale = amax / 127.0;
        }
        if (lane == 0u) {
            q[qbase + p.q_data + h] = bitcast<u32>(scale);
        }
        for (var k = lane; k < quads; k = k + 64u) {
            let e = (4u * k / p.dim) * row + h * p.dim + (4u * k) % p.dim;
            let x = load4(fbase, e);
            var word = 0u;
            for (var j = 0u; j < 4u; j = j + 1u) {
                var v = 0.0;
                if (scale > 0.0) {
                    v = x[j] / scale;
                }
                if (is_nan(v)) {
                    v = 0.0;
                }
                word = word | (encode(v) << (8u * j));
            }
            q[qbase + e / 4u] = word;
        }
    } else {
        let scale = bitcast<f32>(q[qbase + p.q_data + h]);
        for (var k = lane; k < quads; k = k + 64u) {
            let e = (4u * k / p.dim) * row + h * p.dim + (4u * k) % p.dim;
            let word = q[qbase + e / 4u];
            let v = vec4<f32>(decode(word & 0xFFu) * scale, decode((word >> 8u) & 0xFFu) * scale,
                              decode((word >> 16u) & 0xFFu) * scale, decode(word >> 24u) * scale);
            store4(fbase, e, v);
        }
    }
}
