//! The CUDA backend's copy and quantize rates on a GPU, each as a fraction
//! of the one-call contiguous copy of the same bytes in the same run, with
//! every copied block checked against its source. Run by
//! `hal-cuda/device-check.sh`; without a GPU it says so and exits 0.
//!
//! Layout: Llama-3-8B (32 layers × K/V, 8 KV heads × 128, f16, 16-token
//! blocks = 2 MiB), layer-major: 64 scattered 32 KiB pieces per block.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    missing_docs,
    reason = "a measurement program"
)]

use std::process::ExitCode;

use cudarc::driver::sys;
use pagedkv_core::{
    Backend, BatchValidator, BlockCopy, BlockId, BlockOrder, DType, KvLayout, MemoryKind,
    QuantFormat, Quantize, RegionDesc,
};
use pagedkv_hal_cuda::{CopyStrategy, CudaBackend, CudaRegion, probe};

const BLOCKS: u32 = 2000;
const SRC_BLOCKS: u32 = 3000;
const REPS: usize = 5;

fn layout(order: BlockOrder) -> KvLayout {
    KvLayout {
        layers: 32,
        kv_heads: 8,
        head_size: 128,
        tokens_per_block: 16,
        dtype: DType::F16,
        order,
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// `n` distinct block indices below `of`, in random order.
fn scattered(n: u32, of: u32, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..of).collect();
    let mut x = seed;
    for i in (1..v.len()).rev() {
        v.swap(i, (xorshift(&mut x) % (i as u64 + 1)) as usize);
    }
    v.truncate(n as usize);
    v
}

/// Per-block checksums of a region's bytes (pieces in part order).
fn block_sums(bytes: &[u8], l: &KvLayout, blocks: u32) -> Vec<u64> {
    (0..blocks)
        .map(|b| {
            let mut h = 0u64;
            for p in 0..2 * l.layers {
                let part = if p % 2 == 0 {
                    pagedkv_core::KvPart::Key
                } else {
                    pagedkv_core::KvPart::Value
                };
                let o = l.offset(blocks, BlockId(b), p / 2, part).unwrap() as usize;
                let n = l.part_bytes().unwrap() as usize;
                for w in bytes[o..o + n].chunks_exact(8) {
                    h = (h.rotate_left(5) ^ u64::from_le_bytes(w.try_into().unwrap()))
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
                }
            }
            h
        })
        .collect()
}

fn read_all(be: &mut CudaBackend, r: &CudaRegion) -> Vec<u8> {
    let mut v = vec![0u8; r.len() as usize];
    be.read_bytes(r, 0, &mut v).unwrap();
    v
}

struct Bench {
    be: CudaBackend,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    failures: usize,
    zeros: Vec<u8>,
}

impl Bench {
    /// Median milliseconds of `reps` runs of `f`, timed by events on the
    /// backend's stream.
    fn time(&mut self, reps: usize, mut f: impl FnMut(&mut CudaBackend)) -> f64 {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut ms: Vec<f64> = (0..reps)
            .map(|_| {
                let a = self.stream.record_event(flags).unwrap();
                f(&mut self.be);
                let b = self.stream.record_event(flags).unwrap();
                b.synchronize().unwrap();
                f64::from(a.elapsed_ms(&b).unwrap())
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        ms[ms.len() / 2]
    }

    /// One `cuMemcpyAsync` of `bytes` on the backend's stream.
    fn memcpy(&mut self, dst: u64, src: u64, bytes: u64) -> f64 {
        let stream = self.stream.clone();
        self.time(REPS, |_| {
            stream.context().bind_to_thread().unwrap();
            // SAFETY: both ranges lie in live regions of the bench.
            unsafe { sys::cuMemcpyAsync(dst, src, bytes as usize, stream.cu_stream()) }
                .result()
                .unwrap();
        })
    }

    fn batch(
        &mut self,
        reps: usize,
        strategy: CopyStrategy,
        src: &CudaRegion,
        dst: &CudaRegion,
        copies: &[BlockCopy],
    ) -> f64 {
        // Targets start as zeros, so a check sees only this batch's bytes.
        let n = dst.len() as usize;
        if self.zeros.len() < n {
            self.zeros = vec![0u8; n];
        }
        self.be.write_bytes(dst, 0, &self.zeros[..n]).unwrap();
        self.be.set_copy_strategy(strategy);
        let (sn, dn) = (src.desc().block_count, dst.desc().block_count);
        let mut v = BatchValidator::with_capacity(sn.max(dn));
        let ms = self.time(reps, |be| {
            let batch = v.validate(copies, sn, dn, false).unwrap();
            // SAFETY: regions of the bench's backend, live; waited by `time`.
            unsafe { be.copy_blocks(src, dst, batch) }.unwrap();
        });
        self.be.set_copy_strategy(CopyStrategy::Auto);
        ms
    }

    /// Checks every pair's target block against its source block.
    fn check(&mut self, what: &str, src: &CudaRegion, dst: &CudaRegion, copies: &[BlockCopy]) {
        let (l, sn, dn) = (
            src.desc().layout,
            src.desc().block_count,
            dst.desc().block_count,
        );
        let s = block_sums(&read_all(&mut self.be, src), &l, sn);
        let d = block_sums(&read_all(&mut self.be, dst), &dst.desc().layout, dn);
        let bad = copies
            .iter()
            .filter(|c| s[c.src.0 as usize] != d[c.dst.0 as usize])
            .count();
        if bad > 0 {
            println!(
                "CHECKSUM MISMATCH: {what}: {bad} of {} blocks differ from their source",
                copies.len()
            );
            self.failures += 1;
        } else {
            println!(
                "checksums: {what}: all {} copied blocks match their source",
                copies.len()
            );
        }
    }
}

fn gbps(bytes: u64, ms: f64) -> f64 {
    bytes as f64 / ms / 1e6
}

fn pairs(src: &[u32], dst: &[u32]) -> Vec<BlockCopy> {
    src.iter()
        .zip(dst)
        .map(|(&s, &d)| BlockCopy {
            src: BlockId(s),
            dst: BlockId(d),
        })
        .collect()
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    let p = match probe() {
        Ok(p) => p,
        Err(e) => {
            println!("skipped: no CUDA GPU here ({e})");
            let required = std::env::var("PAGEDKV_REQUIRE_CUDA").as_deref() == Ok("1");
            return if required {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let be = CudaBackend::new().expect("the backend opens");
    println!("GPU: {}", be.describe());
    println!(
        "driver CUDA version: {}.{}",
        p.driver_version / 1000,
        p.driver_version % 1000 / 10
    );
    let stream = be.home_stream().unwrap();
    let mut b = Bench {
        be,
        stream,
        failures: 0,
        zeros: Vec::new(),
    };
    let lm = layout(BlockOrder::LayerMajor);
    let block = lm.block_bytes().unwrap();
    let bytes = block * u64::from(BLOCKS);
    println!(
        "{BLOCKS} blocks x {} MiB = {:.2} GB per copy, layer-major: {} pieces of {} KiB per block",
        block >> 20,
        bytes as f64 / 1e9,
        lm.parts_per_copy(),
        lm.part_bytes().unwrap() >> 10
    );
    let region = |b: &mut Bench, n: u32, l: KvLayout, m: MemoryKind| {
        b.be.create_region(&RegionDesc {
            block_count: n,
            layout: l,
            memory: m,
        })
        .expect("region")
    };
    let dev = region(&mut b, SRC_BLOCKS, lm, MemoryKind::Device(0));
    let dev2 = region(&mut b, BLOCKS, lm, MemoryKind::Device(0));
    let host = region(&mut b, BLOCKS, lm, MemoryKind::PinnedHost);
    // A pattern in every source byte.
    let mut x = 0x2545_F491_4F6C_DD1D_u64;
    let fill: Vec<u8> = (0..dev.len() / 8)
        .flat_map(|_| xorshift(&mut x).to_le_bytes())
        .collect();
    b.be.write_bytes(&dev, 0, &fill).unwrap();
    drop(fill);

    let out = pairs(
        &scattered(BLOCKS, SRC_BLOCKS, 1),
        &scattered(BLOCKS, BLOCKS, 2),
    );
    let back: Vec<BlockCopy> = pairs(&scattered(BLOCKS, BLOCKS, 3), &scattered(BLOCKS, BLOCKS, 4));
    let d2d = pairs(
        &scattered(BLOCKS, SRC_BLOCKS, 5),
        &scattered(BLOCKS, BLOCKS, 6),
    );

    let c_dh = b.memcpy(host.device_ptr(), dev.device_ptr(), bytes);
    let c_hd = b.memcpy(dev2.device_ptr(), host.device_ptr(), bytes);
    let c_dd = b.memcpy(dev2.device_ptr(), dev.device_ptr(), bytes);
    let k_out = b.batch(REPS, CopyStrategy::Kernel, &dev, &host, &out);
    b.check(
        "swap out (gather kernel, device -> pinned host)",
        &dev,
        &host,
        &out,
    );
    let k_in = b.batch(REPS, CopyStrategy::Kernel, &host, &dev2, &back);
    b.check(
        "swap in (gather kernel, pinned host -> device)",
        &host,
        &dev2,
        &back,
    );
    let v_out = b.batch(1, CopyStrategy::Memcpy, &dev, &host, &out);
    b.check("swap out (one cuMemcpyAsync per piece)", &dev, &host, &out);
    let k_dd = b.batch(REPS, CopyStrategy::Kernel, &dev, &dev2, &d2d);
    b.check("copy within the GPU (gather kernel)", &dev, &dev2, &d2d);
    let v_dd = b.batch(1, CopyStrategy::Memcpy, &dev, &dev2, &d2d);
    b.check(
        "copy within the GPU (one cuMemcpyDtoDAsync per piece)",
        &dev,
        &dev2,
        &d2d,
    );

    // Quantize 2,000 blocks to int8 and back.
    let q = region(
        &mut b,
        BLOCKS,
        lm.with_dtype(DType::Int8),
        MemoryKind::Device(0),
    );
    let qb = lm.with_dtype(DType::Int8).block_bytes().unwrap() * u64::from(BLOCKS);
    let ident: Vec<BlockCopy> = pairs(
        &(0..BLOCKS).collect::<Vec<_>>(),
        &(0..BLOCKS).collect::<Vec<_>>(),
    );
    // f16 values in [-8, 8] (the random fill is not all finite).
    let vals: Vec<u8> = (0..dev2.len() / 2)
        .flat_map(|i| {
            half::f16::from_f32(((i * 2_654_435_761) % 4001) as f32 / 250.0 - 8.0)
                .to_bits()
                .to_le_bytes()
        })
        .collect();
    b.be.write_bytes(&dev2, 0, &vals).unwrap();
    drop(vals);
    let mut v = BatchValidator::with_capacity(BLOCKS);
    let t_q = b.time(REPS, |be| {
        let batch = v.validate(&ident, BLOCKS, BLOCKS, false).unwrap();
        // SAFETY: live regions of the backend; waited by `time`.
        unsafe { be.quantize(&dev2, &q, batch, QuantFormat::Int8PerHead) }.unwrap();
    });
    let t_d = b.time(REPS, |be| {
        let batch = v.validate(&ident, BLOCKS, BLOCKS, false).unwrap();
        // SAFETY: as above.
        unsafe { be.dequantize(&q, &dev2, batch, QuantFormat::Int8PerHead) }.unwrap();
    });
    let traffic = 2 * (bytes + qb);
    let hbm = 2.0 * gbps(bytes, c_dd);

    println!();
    println!("| copy | GB/s | fraction of the contiguous copy | target |");
    println!("|---|---|---|---|");
    let row = |name: &str, ms: f64, reference: f64, target: &str| {
        let r = gbps(bytes, ms);
        println!("| {name} | {r:.1} | {:.3} | {target} |", r / reference);
    };
    println!(
        "| one contiguous copy, device -> pinned host | {:.1} | 1 | |",
        gbps(bytes, c_dh)
    );
    println!(
        "| one contiguous copy, pinned host -> device | {:.1} | 1 | |",
        gbps(bytes, c_hd)
    );
    row(
        "swap out, one gather kernel",
        k_out,
        gbps(bytes, c_dh),
        ">= 0.90",
    );
    row(
        "swap in, one gather kernel",
        k_in,
        gbps(bytes, c_hd),
        ">= 0.90",
    );
    row(
        "swap out, one cuMemcpyAsync per 32 KiB piece (vLLM)",
        v_out,
        gbps(bytes, c_dh),
        "(reference)",
    );
    println!(
        "| one contiguous cuMemcpyDtoD | {:.1} | 1 | |",
        gbps(bytes, c_dd)
    );
    row(
        "copy within the GPU, one gather kernel",
        k_dd,
        gbps(bytes, c_dd),
        ">= 0.90",
    );
    row(
        "copy within the GPU, one cuMemcpyDtoDAsync per piece",
        v_dd,
        gbps(bytes, c_dd),
        "(reference)",
    );
    let qr = gbps(traffic, t_q + t_d);
    println!(
        "| quantize + dequantize int8 (read + write traffic) | {qr:.1} | {:.3} of HBM traffic ({hbm:.0} GB/s: 2 x the contiguous DtoD) | >= 0.5 |",
        qr / hbm
    );
    println!("(quantize {t_q:.2} ms, dequantize {t_d:.2} ms)");

    // Where the copy engine beats the kernel: runs of block-major blocks.
    let bm = layout(BlockOrder::BlockMajor);
    let dbm = region(&mut b, BLOCKS, bm, MemoryKind::Device(0));
    let hbm_r = region(&mut b, BLOCKS, bm, MemoryKind::PinnedHost);
    println!();
    println!(
        "| contiguous run (block-major), device -> pinned host | kernel GB/s | copy engine GB/s |"
    );
    println!("|---|---|---|");
    for run in [1u32, 2, 4, 16, 256, BLOCKS] {
        let c = pairs(&(0..run).collect::<Vec<_>>(), &(0..run).collect::<Vec<_>>());
        let rb = block * u64::from(run);
        let k = b.batch(REPS, CopyStrategy::Kernel, &dbm, &hbm_r, &c);
        let m = b.batch(REPS, CopyStrategy::Memcpy, &dbm, &hbm_r, &c);
        if run == BLOCKS {
            b.check(
                "a 2,000-block block-major run through the copy engine",
                &dbm,
                &hbm_r,
                &c,
            );
        }
        println!(
            "| {run} blocks ({} MiB) | {:.1} | {:.1} |",
            rb >> 20,
            gbps(rb, k),
            gbps(rb, m)
        );
    }
    // SAFETY: every fence was waited.
    unsafe {
        for r in [dev, dev2, host, q, dbm, hbm_r] {
            b.be.destroy_region(r);
        }
    }
    if b.failures > 0 {
        println!("{} checksum failures", b.failures);
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
