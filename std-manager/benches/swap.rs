//! Swap out + in of 1,000 blocks of a realistic layout (32 layers, 8 KV
//! heads, head size 128, f16, 16 tokens per block, block-major: 2 MiB per
//! block, 2 GiB per direction) through the manager on hal-host, against a
//! plain `copy_from_slice` of the same bytes in the same run.
//! `cargo bench -p pagedkv-manager --bench swap`
#![allow(missing_docs, reason = "criterion macros generate undocumented items")]
#![allow(
    clippy::cast_possible_truncation,
    reason = "byte patterns and sizes of a 64-bit bench"
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pagedkv_manager::{
    AdvancedKvCacheManager, AllocationRequest, BlockOrder, DType, HostBackend, HostManager,
    KvCacheManager, KvLayout, ManagerConfig, RequestId,
};

const BLOCKS: usize = 1000;

fn layout() -> KvLayout {
    KvLayout {
        layers: 32,
        kv_heads: 8,
        head_size: 128,
        tokens_per_block: 16,
        dtype: DType::F16,
        order: BlockOrder::BlockMajor,
    }
}

fn swap(c: &mut Criterion) {
    let l = layout();
    let bytes = l.block_bytes().unwrap() as usize * BLOCKS;
    let mut g = c.benchmark_group("swap_1000_blocks");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(2 * bytes as u64));

    // Baseline: the same bytes out and back with `copy_from_slice`.
    let device: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let mut dev = device.clone();
    let mut host = vec![0u8; bytes];
    g.bench_function("copy_from_slice", |b| {
        b.iter(|| {
            host.copy_from_slice(black_box(&dev));
            dev.copy_from_slice(black_box(&host));
        })
    });
    drop((device, dev, host));

    let mut cfg = ManagerConfig::new(l, BLOCKS);
    cfg.host_blocks = BLOCKS;
    cfg.max_sequence_length = BLOCKS * 16;
    cfg.max_sequences = 4;
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut req = AllocationRequest::for_prompt(RequestId(1), vec![], BLOCKS * 16, &l);
    req.initial_tokens = BLOCKS * 16;
    let _h = rt.block_on(m.allocate(&req)).unwrap();
    let fill: Vec<u8> = (0..l.block_bytes().unwrap() as usize)
        .map(|i| (i * 7) as u8)
        .collect();
    for i in 0..BLOCKS {
        m.write_block(RequestId(1), i, &fill).unwrap();
    }
    g.bench_function("manager_swap_out_in", |b| {
        b.iter(|| {
            rt.block_on(async {
                m.swap_out(RequestId(1)).await.unwrap();
                m.swap_in(RequestId(1)).await.unwrap();
            })
        })
    });
    g.finish();
}

criterion_group!(benches, swap);
criterion_main!(benches);
