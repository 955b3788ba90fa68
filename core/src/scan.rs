//! The bucket scan of the prefix index: which of a bucket's eight entries
//! match a tag, as a bitmask, in a handful of instructions.
//!
//! On x86-64 it is two SSE2 compares and two `movmskps` (SSE2 is part of the
//! x86-64 baseline; the one `unsafe` block is the call into the
//! `#[target_feature]` function, see its SAFETY comment); elsewhere a
//! branch-free scalar loop. The `scan_agrees_with_scalar` test
//! checks the two against each other (also under miri, which implements
//! these intrinsics).
#![allow(
    unsafe_code,
    reason = "the call into the #[target_feature] function; see its SAFETY reason"
)]

/// Bit `w` set where `bucket[w] & select == want`.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[inline]
pub(crate) fn matches(bucket: &[u32; 8], select: u32, want: u32) -> u32 {
    // SAFETY: `sse2_matches` only needs SSE2, which this build enables (the
    // `cfg` above; it is in every x86-64 target's baseline). It reads
    // nothing but its arguments.
    unsafe { sse2_matches(bucket, select, want) }
}

#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[inline]
#[target_feature(enable = "sse2")]
fn sse2_matches(bucket: &[u32; 8], select: u32, want: u32) -> u32 {
    use core::arch::x86_64::{
        _mm_and_si128, _mm_castsi128_ps, _mm_cmpeq_epi32, _mm_movemask_ps, _mm_set_epi32,
        _mm_set1_epi32,
    };
    let e = bucket.map(u32::cast_signed);
    let sel = _mm_set1_epi32(select.cast_signed());
    let want = _mm_set1_epi32(want.cast_signed());
    let lo = _mm_set_epi32(e[3], e[2], e[1], e[0]);
    let hi = _mm_set_epi32(e[7], e[6], e[5], e[4]);
    let lo = _mm_cmpeq_epi32(_mm_and_si128(lo, sel), want);
    let hi = _mm_cmpeq_epi32(_mm_and_si128(hi, sel), want);
    let m = _mm_movemask_ps(_mm_castsi128_ps(lo)) | (_mm_movemask_ps(_mm_castsi128_ps(hi)) << 4);
    m.cast_unsigned()
}

/// Bit `w` set where `bucket[w] & select == want`.
#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
#[inline]
pub(crate) fn matches(bucket: &[u32; 8], select: u32, want: u32) -> u32 {
    scalar(bucket, select, want)
}

#[cfg_attr(
    all(target_arch = "x86_64", target_feature = "sse2"),
    allow(dead_code, reason = "the reference the test compares with")
)]
#[inline]
fn scalar(bucket: &[u32; 8], select: u32, want: u32) -> u32 {
    let mut m = 0u32;
    for (w, &e) in bucket.iter().enumerate() {
        m |= u32::from(e & select == want) << w;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_agrees_with_scalar() {
        let mut x = 0x9e37_79b9_u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let n = if cfg!(miri) { 200 } else { 20_000 };
        for i in 0..n {
            let mut b = [0u32; 8];
            for e in &mut b {
                // Few distinct values, so that matches are common.
                *e = (next() % 4) | if i % 3 == 0 { 0x8000_0000 } else { 0 };
            }
            let select = [u32::MAX, 3, 0x8000_0003, 0][i % 4];
            let want = b[i % 8] & select;
            assert_eq!(matches(&b, select, want), scalar(&b, select, want), "{b:?}");
            assert_eq!(
                matches(&b, u32::MAX, u32::MAX),
                scalar(&b, u32::MAX, u32::MAX)
            );
        }
        assert_eq!(matches(&[u32::MAX; 8], u32::MAX, u32::MAX), 0xff);
        assert_eq!(matches(&[0; 8], u32::MAX, 1), 0);
    }
}
