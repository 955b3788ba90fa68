//! The Vulkan backend on a real GPU: 2,000 scattered layer-major blocks of
//! Llama-3-8B (64 pieces of 32 KiB per block) copied in one batch, as a
//! fraction of one contiguous `vkCmdCopyBuffer` of the same bytes in the
//! same run, with every copied block checked. Run by
//! `hal-vulkan/device-check.sh`; without Vulkan it says so and exits 0
//! (1 with `PAGEDKV_REQUIRE_VULKAN=1`).
#![allow(
    missing_docs,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "a measurement program"
)]

use std::process::ExitCode;
use std::time::Instant;

use pagedkv_core::{
    Backend, BatchValidator, BlockCopy, BlockId, BlockOrder, DType, KvLayout, KvPart, MemoryKind,
    RegionDesc,
};
use pagedkv_hal_vulkan::{VulkanBackend, VulkanOptions, VulkanRegion};

/// Blocks per batch (`PAGEDKV_BENCH_BLOCKS`, default 2,000: fewer for a
/// smoke run on a small machine).
fn blocks() -> u32 {
    std::env::var("PAGEDKV_BENCH_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

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

fn scattered(n: u32, of: u32, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..of).collect();
    let mut x = seed;
    for i in (1..v.len()).rev() {
        v.swap(i, (xorshift(&mut x) % (i as u64 + 1)) as usize);
    }
    v.truncate(n as usize);
    v
}

fn block_sums(be: &mut VulkanBackend, r: &VulkanRegion) -> Vec<u64> {
    let d = *r.desc();
    let mut bytes = vec![0u8; r.len() as usize];
    be.read_bytes(r, 0, &mut bytes).unwrap();
    let l = d.layout;
    let n = l.part_bytes().unwrap() as usize;
    (0..d.block_count)
        .map(|b| {
            let mut h = 0u64;
            for p in 0..2 * l.layers {
                let part = if p % 2 == 0 {
                    KvPart::Key
                } else {
                    KvPart::Value
                };
                let o = l.offset(d.block_count, BlockId(b), p / 2, part).unwrap() as usize;
                for w in bytes[o..o + n].chunks_exact(8) {
                    h = (h.rotate_left(5) ^ u64::from_le_bytes(w.try_into().unwrap()))
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
                }
            }
            h
        })
        .collect()
}

/// Median seconds of 5 runs of one batch, each waited.
fn time(
    be: &mut VulkanBackend,
    src: &VulkanRegion,
    dst: &VulkanRegion,
    copies: &[BlockCopy],
) -> f64 {
    let (sn, dn) = (src.desc().block_count, dst.desc().block_count);
    let mut v = BatchValidator::with_capacity(sn.max(dn));
    let mut s: Vec<f64> = (0..5)
        .map(|_| {
            let batch = v.validate(copies, sn, dn, false).unwrap();
            let t = Instant::now();
            // SAFETY: live regions of `be`; waited at once.
            let f = unsafe { be.copy_blocks(src, dst, batch) }.unwrap();
            be.wait(&f).unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();
    s.sort_by(f64::total_cmp);
    s[2]
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    let mut be = match VulkanBackend::new(&VulkanOptions::default()) {
        Ok(b) => b,
        Err(e) => {
            println!("skipped: no usable Vulkan here ({e})");
            let required = std::env::var("PAGEDKV_REQUIRE_VULKAN").as_deref() == Ok("1");
            return if required {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    println!("device: {}", be.describe());
    let n = blocks();
    let src_n = n + n / 50;
    let region = |be: &mut VulkanBackend, n: u32, order| {
        be.create_region(&RegionDesc {
            block_count: n,
            layout: layout(order),
            memory: MemoryKind::Device(0),
        })
        .expect("region")
    };
    let lm_src = region(&mut be, src_n, BlockOrder::LayerMajor);
    let lm_dst = region(&mut be, n, BlockOrder::LayerMajor);
    let bm_src = region(&mut be, n, BlockOrder::BlockMajor);
    let bm_dst = region(&mut be, n, BlockOrder::BlockMajor);
    let mut x = 0x2545_F491_4F6C_DD1D_u64;
    let fill: Vec<u8> = (0..lm_src.len() / 8)
        .flat_map(|_| xorshift(&mut x).to_le_bytes())
        .collect();
    be.write_bytes(&lm_src, 0, &fill).unwrap();
    be.write_bytes(&bm_src, 0, &fill[..bm_src.len() as usize])
        .unwrap();
    drop(fill);
    let bytes = layout(BlockOrder::LayerMajor).block_bytes().unwrap() * u64::from(n);
    let run: Vec<BlockCopy> = (0..n)
        .map(|i| BlockCopy {
            src: BlockId(i),
            dst: BlockId(i),
        })
        .collect();
    let (s, d) = (scattered(n, src_n, 1), scattered(n, n, 2));
    let scatter: Vec<BlockCopy> = s
        .iter()
        .zip(&d)
        .map(|(&s, &d)| BlockCopy {
            src: BlockId(s),
            dst: BlockId(d),
        })
        .collect();
    let contiguous = time(&mut be, &bm_src, &bm_dst, &run);
    let batch = time(&mut be, &lm_src, &lm_dst, &scatter);
    let src_sums = block_sums(&mut be, &lm_src);
    let dst_sums = block_sums(&mut be, &lm_dst);
    let bad = scatter
        .iter()
        .filter(|c| src_sums[c.src.0 as usize] != dst_sums[c.dst.0 as usize])
        .count();
    let gbs = |t: f64| bytes as f64 / t / 1e9;
    println!("{:.2} GB per copy", bytes as f64 / 1e9);
    println!("| copy | GB/s | fraction | target |");
    println!("|---|---|---|---|");
    println!(
        "| one contiguous vkCmdCopyBuffer (block-major run) | {:.1} | 1 | |",
        gbs(contiguous)
    );
    println!(
        "| {n} scattered layer-major blocks, one batch ({} ranges) | {:.1} | {:.3} | >= 0.9 |",
        n * 64,
        gbs(batch),
        contiguous / batch
    );
    let messages = be.validation_messages();
    // SAFETY: every fence was waited.
    unsafe {
        for r in [lm_src, lm_dst, bm_src, bm_dst] {
            be.destroy_region(r);
        }
    }
    if bad > 0 || messages > 0 {
        println!("FAILED: {bad} blocks differ from their source, {messages} validation messages");
        return ExitCode::FAILURE;
    }
    println!("checksums: all {n} copied blocks match their source");
    ExitCode::SUCCESS
}
