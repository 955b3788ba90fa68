//! The Vulkan backend on whatever device the loader offers (lavapipe in
//! CI), under the validation layer: quantization against hal-host's bytes,
//! bad batches, foreign and destroyed regions, a device that does not
//! exist. Skips without Vulkan (fails with `PAGEDKV_REQUIRE_VULKAN=1`).
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use pagedkv_core::{
    Backend, BackendError, BatchValidator, BlockCopy, BlockId, BlockOrder, DType, ErrorKind,
    KvLayout, MemoryKind, QuantFormat, Quantize, RegionDesc,
};
use pagedkv_hal_host::HostBackend;
use pagedkv_hal_vulkan::{DeviceChoice, VulkanBackend, VulkanOptions, skip_reason};

fn options(force_staging: bool) -> VulkanOptions {
    VulkanOptions {
        force_staging,
        validation: true,
        ..VulkanOptions::default()
    }
}

fn open(force_staging: bool) -> Option<VulkanBackend> {
    if let Some(why) = skip_reason(&options(force_staging)) {
        eprintln!("{why}");
        return None;
    }
    Some(VulkanBackend::new(&options(force_staging)).unwrap())
}

fn encode(n: usize, dtype: DType, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .flat_map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = match i % 509 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -1e-30,
                _ => ((x % 20001) as f32 - 10000.0) / 997.0 * (1 + i % 7) as f32,
            };
            match dtype {
                DType::F32 => v.to_le_bytes().to_vec(),
                DType::F16 => half::f16::from_f32(v).to_bits().to_le_bytes().to_vec(),
                _ => half::bf16::from_f32(v).to_bits().to_le_bytes().to_vec(),
            }
        })
        .collect()
}

/// Quantizes 16 blocks and restores them; returns both regions' bytes.
fn round_trip<B: Quantize>(
    be: &mut B,
    full: KvLayout,
    format: QuantFormat,
    data: &[u8],
    memory: MemoryKind,
) -> (Vec<u8>, Vec<u8>) {
    let n = 16u32;
    let desc = RegionDesc {
        block_count: n,
        layout: full,
        memory,
    };
    let ql = full.with_dtype(pagedkv_hal_host::quant::format_dtype(format));
    let a = be.create_region(&desc).unwrap();
    let q = be
        .create_region(&RegionDesc { layout: ql, ..desc })
        .unwrap();
    let back = be.create_region(&desc).unwrap();
    be.write_bytes(&a, 0, data).unwrap();
    let copies: Vec<BlockCopy> = (0..n)
        .map(|i| BlockCopy {
            src: BlockId(i),
            dst: BlockId((i * 5) % n),
        })
        .collect();
    let inverse: Vec<BlockCopy> = copies
        .iter()
        .map(|c| BlockCopy {
            src: c.dst,
            dst: c.src,
        })
        .collect();
    let mut v = BatchValidator::with_capacity(n);
    // SAFETY: regions of `be`, live; each fence waited before the next use.
    unsafe {
        let f = be
            .quantize(&a, &q, v.validate(&copies, n, n, false).unwrap(), format)
            .unwrap();
        be.wait(&f).unwrap();
        let f = be
            .dequantize(
                &q,
                &back,
                v.validate(&inverse, n, n, false).unwrap(),
                format,
            )
            .unwrap();
        be.wait(&f).unwrap();
    }
    let mut qb = vec![0u8; ql.region_bytes(n).unwrap() as usize];
    be.read_bytes(&q, 0, &mut qb).unwrap();
    let mut bb = vec![0u8; data.len()];
    be.read_bytes(&back, 0, &mut bb).unwrap();
    // SAFETY: nothing in flight.
    unsafe {
        be.destroy_region(a);
        be.destroy_region(q);
        be.destroy_region(back);
    }
    (qb, bb)
}

/// On lavapipe (LLVM's IEEE division) the shader gives hal-host's bytes
/// exactly; on other drivers WGSL allows a division 2.5 ulp off, so there
/// the conformance suite's error bound is the contract, and this test only
/// reports how many bytes differ.
#[test]
fn quantization_matches_hal_host() {
    let Some(mut be) = open(false) else { return };
    let exact_expected = be.describe().contains("llvmpipe");
    for order in [BlockOrder::BlockMajor, BlockOrder::LayerMajor] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for format in [QuantFormat::Int8PerHead, QuantFormat::Fp8E4M3PerHead] {
                let l = KvLayout {
                    layers: 2,
                    kv_heads: 3,
                    head_size: 12,
                    tokens_per_block: 5,
                    dtype,
                    order,
                };
                let n = (l.region_bytes(16).unwrap() / u64::from(dtype.size_bytes())) as usize;
                let data = encode(n, dtype, 7);
                let want = round_trip(&mut HostBackend::new(), l, format, &data, MemoryKind::Host);
                let got = round_trip(&mut be, l, format, &data, MemoryKind::Device(0));
                let diff = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count();
                let (dq, db) = (diff(&got.0, &want.0), diff(&got.1, &want.1));
                eprintln!(
                    "{order:?} {dtype:?} {format:?}: {dq} compressed and {db} restored bytes differ"
                );
                if exact_expected {
                    assert_eq!(
                        (dq, db),
                        (0, 0),
                        "{order:?} {dtype:?} {format:?} on lavapipe"
                    );
                }
            }
        }
    }
    let messages = be.message_counter();
    drop(be);
    assert_eq!(
        messages.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "validation messages"
    );
}

#[test]
fn bad_batches_and_regions_are_typed_errors() {
    let Some(mut be) = open(true) else { return };
    let mut other = VulkanBackend::new(&options(false)).unwrap();
    let l = KvLayout {
        layers: 2,
        kv_heads: 2,
        head_size: 8,
        tokens_per_block: 4,
        dtype: DType::F16,
        order: BlockOrder::BlockMajor,
    };
    let d = RegionDesc {
        block_count: 8,
        layout: l,
        memory: MemoryKind::Device(0),
    };
    let a = be.create_region(&d).unwrap();
    let b = be
        .create_region(&RegionDesc {
            block_count: 4,
            ..d
        })
        .unwrap();
    let foreign = other.create_region(&d).unwrap();
    let c = [BlockCopy {
        src: BlockId(1),
        dst: BlockId(2),
    }];
    let mut v = BatchValidator::with_capacity(8);
    // SAFETY: live regions; every call below is refused before any work.
    unsafe {
        assert!(
            be.copy_blocks(&a, &b, v.validate(&c, 8, 8, false).unwrap())
                .is_err(),
            "wrong block count"
        );
        assert!(
            be.copy_blocks(&a, &a, v.validate(&c, 8, 8, false).unwrap())
                .is_err(),
            "wrong pairing"
        );
        assert!(
            be.copy_blocks(&a, &foreign, v.validate(&c, 8, 8, false).unwrap())
                .is_err(),
            "foreign"
        );
        let q = be
            .create_region(&RegionDesc {
                layout: l.with_dtype(DType::Fp8E4M3),
                ..d
            })
            .unwrap();
        let e = be
            .quantize(
                &a,
                &q,
                v.validate(&c, 8, 8, false).unwrap(),
                QuantFormat::Int8PerHead,
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        be.destroy_region(q);
        // A head width the shader cannot split into whole words.
        let odd = KvLayout { head_size: 6, ..l };
        let f = be.create_region(&RegionDesc { layout: odd, ..d }).unwrap();
        let fq = be
            .create_region(&RegionDesc {
                layout: odd.with_dtype(DType::Int8),
                ..d
            })
            .unwrap();
        let e = be
            .quantize(
                &f,
                &fq,
                v.validate(&c, 8, 8, false).unwrap(),
                QuantFormat::Int8PerHead,
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        be.destroy_region(f);
        be.destroy_region(fq);
    }
    let end = l.region_bytes(8).unwrap();
    assert!(be.write_bytes(&a, end - 1, &[0, 0]).is_err());
    assert!(be.read_bytes(&a, u64::MAX, &mut [0]).is_err());
    assert!(be.write_bytes(&foreign, 0, &[0]).is_err());
    let c = [BlockCopy {
        src: BlockId(0),
        dst: BlockId(1),
    }];
    // SAFETY: a live region of `other`; waited just below.
    let theirs =
        unsafe { other.copy_blocks(&foreign, &foreign, v.validate(&c, 8, 8, true).unwrap()) }
            .unwrap();
    other.wait(&theirs).unwrap();
    let f = be.poll(&theirs);
    assert!(f.is_err(), "a foreign fence is refused");
    // SAFETY: nothing in flight (all waited or refused).
    unsafe {
        be.destroy_region(a);
        be.destroy_region(b);
        other.destroy_region(foreign);
    }
    let (m1, m2) = (be.message_counter(), other.message_counter());
    drop(be);
    drop(other);
    let n = m1.load(std::sync::atomic::Ordering::Relaxed)
        + m2.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(n, 0, "validation messages");
}

#[test]
fn a_device_that_does_not_exist_is_unsupported() {
    if open(false).is_none() {
        return;
    }
    let o = VulkanOptions {
        device: Some(DeviceChoice::Name("no such GPU".into())),
        ..options(false)
    };
    assert_eq!(
        VulkanBackend::new(&o).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    let o = VulkanOptions {
        device: Some(DeviceChoice::Index(999)),
        ..options(false)
    };
    assert_eq!(
        VulkanBackend::new(&o).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
}
