//! The CUDA backend on a GPU: quantization gives hal-host's bytes exactly,
//! every copy path moves the right bytes, bad batches are typed errors.
//! Without a GPU each test prints why it skips (and fails with
//! `PAGEDKV_REQUIRE_CUDA=1`); the suite shared with the other backends runs
//! from `tests/tests/conformance_cuda.rs`.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use pagedkv_core::{
    Backend, BackendError, BatchValidator, BlockCopy, BlockId, BlockOrder, DType, ErrorKind,
    KvLayout, MemoryKind, QuantFormat, Quantize, RegionDesc,
};
use pagedkv_hal_cuda::{CopyStrategy, CudaBackend, probe, skip_reason};
use pagedkv_hal_host::HostBackend;

fn gpu() -> Option<CudaBackend> {
    if let Some(why) = skip_reason() {
        eprintln!("{why}");
        return None;
    }
    Some(CudaBackend::new().expect("a GPU is present: the backend opens"))
}

fn layout(order: BlockOrder, dtype: DType) -> KvLayout {
    KvLayout {
        layers: 4,
        kv_heads: 4,
        head_size: 64,
        tokens_per_block: 16,
        dtype,
        order,
    }
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match i % 509 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -1e-30,
                _ => ((x % 20001) as f32 - 10000.0) / 997.0 * (1 + i % 7) as f32,
            }
        })
        .collect()
}

fn encode(v: &[f32], dtype: DType) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| match dtype {
            DType::F32 => x.to_le_bytes().to_vec(),
            DType::F16 => half::f16::from_f32(x).to_bits().to_le_bytes().to_vec(),
            _ => half::bf16::from_f32(x).to_bits().to_le_bytes().to_vec(),
        })
        .collect()
}

/// Runs quantize then dequantize of `copies` on a backend; returns the
/// compressed region's bytes and the restored region's bytes.
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
    let qd = RegionDesc {
        layout: full.with_dtype(pagedkv_hal_host::quant::format_dtype(format)),
        ..desc
    };
    let a = be.create_region(&desc).unwrap();
    let q = be.create_region(&qd).unwrap();
    let back = be.create_region(&desc).unwrap();
    be.write_bytes(&a, 0, data).unwrap();
    let zero = vec![0u8; full.with_dtype(qd.layout.dtype).region_bytes(n).unwrap() as usize];
    be.write_bytes(&q, 0, &zero).unwrap();
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
    // SAFETY: regions of `be`, live; each fence is waited before the next use.
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
    let mut qb = zero.clone();
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

#[test]
fn without_a_gpu_the_backend_is_unsupported_not_a_panic() {
    match probe() {
        Ok(p) => {
            assert!(p.devices > 0);
            let be = CudaBackend::new().expect("a GPU is present");
            eprintln!("GPU: {} (driver {})", be.describe(), p.driver_version);
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
            let err = CudaBackend::new().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
            eprintln!("no GPU here: {err}");
        }
    }
}

#[test]
fn quantization_gives_hal_hosts_bytes_exactly() {
    let Some(mut gpu) = gpu() else { return };
    for order in [BlockOrder::BlockMajor, BlockOrder::LayerMajor] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for format in [QuantFormat::Int8PerHead, QuantFormat::Fp8E4M3PerHead] {
                let full = layout(order, dtype);
                let elems =
                    (full.region_bytes(16).unwrap() / u64::from(dtype.size_bytes())) as usize;
                let data = encode(&values(elems, 7), dtype);
                for memory in [MemoryKind::Device(0), MemoryKind::PinnedHost] {
                    let want = round_trip(
                        &mut HostBackend::new(),
                        full,
                        format,
                        &data,
                        MemoryKind::Host,
                    );
                    let got = round_trip(&mut gpu, full, format, &data, memory);
                    assert!(
                        got.0 == want.0,
                        "{order:?} {dtype:?} {format:?} {memory:?}: compressed bytes differ"
                    );
                    assert!(
                        got.1 == want.1,
                        "{order:?} {dtype:?} {format:?} {memory:?}: restored bytes differ"
                    );
                }
            }
        }
    }
}

#[test]
fn kernel_and_copy_engine_paths_move_the_same_bytes() {
    let Some(mut gpu) = gpu() else { return };
    let full = layout(BlockOrder::LayerMajor, DType::F16);
    let mut results = Vec::new();
    for strategy in [
        CopyStrategy::Kernel,
        CopyStrategy::Memcpy,
        CopyStrategy::Auto,
    ] {
        gpu.set_copy_strategy(strategy);
        for (from, to) in [
            (MemoryKind::Device(0), MemoryKind::PinnedHost),
            (MemoryKind::PinnedHost, MemoryKind::Device(0)),
            (MemoryKind::Device(0), MemoryKind::Device(0)),
        ] {
            results.push(copied(&mut gpu, full, from, to));
        }
    }
    assert!(
        results.windows(2).all(|w| w[0] == w[1]),
        "every path and strategy gives the same bytes"
    );
    assert!(results[0].iter().any(|&b| b != 0));
    let want = copied(
        &mut HostBackend::new(),
        full,
        MemoryKind::Host,
        MemoryKind::Host,
    );
    assert!(results[0] == want, "the GPU's copies equal hal-host's");
}

#[test]
fn bad_batches_and_foreign_regions_are_typed_errors() {
    let Some(mut gpu) = gpu() else { return };
    let mut other = CudaBackend::new().unwrap();
    let full = layout(BlockOrder::BlockMajor, DType::F16);
    let d = RegionDesc {
        block_count: 8,
        layout: full,
        memory: MemoryKind::Device(0),
    };
    let a = gpu.create_region(&d).unwrap();
    let b = gpu
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
    // SAFETY: regions live; every call below is refused before any work.
    unsafe {
        assert!(
            gpu.copy_blocks(&a, &b, v.validate(&c, 8, 8, false).unwrap())
                .is_err(),
            "wrong block count"
        );
        assert!(
            gpu.copy_blocks(&a, &a, v.validate(&c, 8, 8, false).unwrap())
                .is_err(),
            "wrong pairing"
        );
        assert!(
            gpu.copy_blocks(&a, &foreign, v.validate(&c, 8, 8, false).unwrap())
                .is_err(),
            "foreign"
        );
        let q = RegionDesc {
            layout: full.with_dtype(DType::Fp8E4M3),
            ..d
        };
        let qr = gpu.create_region(&q).unwrap();
        let e = gpu
            .quantize(
                &a,
                &qr,
                v.validate(&c, 8, 8, false).unwrap(),
                QuantFormat::Int8PerHead,
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        gpu.destroy_region(qr);
    }
    assert!(
        gpu.write_bytes(&a, full.region_bytes(8).unwrap() - 1, &[0, 0])
            .is_err()
    );
    assert!(gpu.read_bytes(&a, u64::MAX, &mut [0]).is_err());
    let huge = RegionDesc {
        block_count: u32::MAX,
        ..d
    };
    assert_eq!(
        gpu.create_region(&huge).unwrap_err().kind(),
        ErrorKind::OutOfMemory
    );
    // SAFETY: nothing in flight.
    unsafe {
        gpu.destroy_region(a);
        gpu.destroy_region(b);
        other.destroy_region(foreign);
    }
}

/// Copies 40 scattered blocks of a region of `layout` between two memories
/// of `be`; returns the target's bytes.
fn copied<B: Backend>(be: &mut B, layout: KvLayout, from: MemoryKind, to: MemoryKind) -> Vec<u8> {
    let n = 64u32;
    let bytes = layout.region_bytes(n).unwrap() as usize;
    let data: Vec<u8> = (0..bytes).map(|i| (i * 31 + i / 4096) as u8).collect();
    let a = be
        .create_region(&RegionDesc {
            block_count: n,
            layout,
            memory: from,
        })
        .unwrap();
    let b = be
        .create_region(&RegionDesc {
            block_count: n,
            layout,
            memory: to,
        })
        .unwrap();
    be.write_bytes(&a, 0, &data).unwrap();
    be.write_bytes(&b, 0, &vec![0u8; bytes]).unwrap();
    let copies: Vec<BlockCopy> = (0..40)
        .map(|i| BlockCopy {
            src: BlockId((i * 7) % n),
            dst: BlockId(i),
        })
        .collect();
    let mut v = BatchValidator::with_capacity(n);
    // SAFETY: regions of `be`, live; waited below.
    let f = unsafe { be.copy_blocks(&a, &b, v.validate(&copies, n, n, false).unwrap()) }.unwrap();
    be.wait(&f).unwrap();
    assert!(be.poll(&f).unwrap(), "fence signalled after wait");
    let mut out = vec![0u8; bytes];
    be.read_bytes(&b, 0, &mut out).unwrap();
    // SAFETY: nothing in flight.
    unsafe {
        be.destroy_region(a);
        be.destroy_region(b);
    }
    out
}

/// Layouts whose pieces are not 16-byte multiples take the 8, 4 and 1-byte
/// copy kernels; quantized parts of odd sizes and heads of odd widths take
/// the quantize kernel's unaligned paths. Each gives hal-host's bytes.
#[test]
fn odd_layouts_give_hal_hosts_bytes() {
    let Some(mut gpu) = gpu() else { return };
    let shapes = [
        (1, 3, 1, DType::F16),  // 6-byte pieces: 1-byte kernel
        (1, 1, 1, DType::F32),  // 4-byte pieces: 4-byte kernel
        (2, 4, 1, DType::F16),  // 16-byte pieces
        (3, 5, 3, DType::BF16), // 90-byte pieces
        (2, 4, 2, DType::Int8), // 16 + 8 scale bytes = 24: 8-byte kernel
        (1, 3, 1, DType::Fp8E4M3),
    ];
    for (heads, dim, tokens, dtype) in shapes {
        for order in [BlockOrder::BlockMajor, BlockOrder::LayerMajor] {
            let l = KvLayout {
                layers: 3,
                kv_heads: heads,
                head_size: dim,
                tokens_per_block: tokens,
                dtype,
                order,
            };
            for strategy in [CopyStrategy::Kernel, CopyStrategy::Memcpy] {
                gpu.set_copy_strategy(strategy);
                for (from, to) in [
                    (MemoryKind::Device(0), MemoryKind::PinnedHost),
                    (MemoryKind::PinnedHost, MemoryKind::Device(0)),
                    (MemoryKind::Device(0), MemoryKind::Device(0)),
                ] {
                    let want = copied(
                        &mut HostBackend::new(),
                        l,
                        MemoryKind::Host,
                        MemoryKind::Host,
                    );
                    let got = copied(&mut gpu, l, from, to);
                    assert!(
                        got == want,
                        "{l:?} {strategy:?} {from:?}->{to:?}: bytes differ from hal-host's"
                    );
                }
            }
            if dtype.is_quantized() {
                continue;
            }
            for format in [QuantFormat::Int8PerHead, QuantFormat::Fp8E4M3PerHead] {
                let elems = (l.region_bytes(16).unwrap() / u64::from(dtype.size_bytes())) as usize;
                let data = encode(&values(elems, 11), dtype);
                let want = round_trip(&mut HostBackend::new(), l, format, &data, MemoryKind::Host);
                let got = round_trip(&mut gpu, l, format, &data, MemoryKind::Device(0));
                assert!(
                    got == want,
                    "{l:?} {format:?}: quantized bytes differ from hal-host's"
                );
            }
        }
    }
    gpu.set_copy_strategy(CopyStrategy::Auto);
}
