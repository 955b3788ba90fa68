//! A batch of 1,000 scattered block copies of the manager bench's layout
//! (Llama-3-8B: 32 layers × K/V, 8 KV heads × 128, f16, 16-token blocks =
//! 2 MiB, block-major) between two device regions, on the Vulkan backend
//! (whatever device the loader offers first: a GPU, else lavapipe) and on
//! hal-host in the same run. `cargo bench -p pagedkv-hal-vulkan --bench copy`.
#![allow(missing_docs, clippy::cast_possible_truncation, reason = "a bench")]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pagedkv_core::{
    Backend, BatchValidator, BlockCopy, BlockId, BlockOrder, DType, KvLayout, MemoryKind,
    RegionDesc,
};
use pagedkv_hal_host::HostBackend;
use pagedkv_hal_vulkan::{VulkanBackend, VulkanOptions};

const BLOCKS: u32 = 1024;
const COPIES: u32 = 1000;

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

fn scattered(seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..BLOCKS).collect();
    let mut x = seed;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn bench_on<B: Backend>(c: &mut Criterion, name: &str, be: &mut B) {
    let desc = RegionDesc {
        block_count: BLOCKS,
        layout: layout(),
        memory: MemoryKind::Device(0),
    };
    let a = be.create_region(&desc).expect("source region");
    let b = be.create_region(&desc).expect("target region");
    let fill = vec![7u8; layout().region_bytes(BLOCKS).unwrap() as usize];
    be.write_bytes(&a, 0, &fill).unwrap();
    drop(fill);
    let (s, d) = (scattered(1), scattered(2));
    let copies: Vec<BlockCopy> = (0..COPIES as usize)
        .map(|i| BlockCopy {
            src: BlockId(s[i]),
            dst: BlockId(d[i]),
        })
        .collect();
    let mut v = BatchValidator::with_capacity(BLOCKS);
    let mut g = c.benchmark_group("scattered_copy_1000_blocks");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(
        u64::from(COPIES) * layout().block_bytes().unwrap(),
    ));
    g.bench_function(name, |bch| {
        bch.iter(|| {
            let batch = v.validate(&copies, BLOCKS, BLOCKS, false).unwrap();
            // SAFETY: live regions of `be`; the fence is waited at once.
            let f = unsafe { be.copy_blocks(&a, &b, batch) }.unwrap();
            be.wait(&f).unwrap();
        });
    });
    g.finish();
    // SAFETY: nothing in flight.
    unsafe {
        be.destroy_region(a);
        be.destroy_region(b);
    }
}

fn copies(c: &mut Criterion) {
    bench_on(c, "hal-host", &mut HostBackend::new());
    match VulkanBackend::new(&VulkanOptions::default()) {
        Ok(mut be) => {
            eprintln!("vulkan device: {}", be.describe());
            bench_on(c, "vulkan", &mut be);
        }
        Err(e) => eprintln!("skipped the Vulkan run: {e}"),
    }
}

criterion_group!(benches, copies);
criterion_main!(benches);
